"""The command end to end on a local Hugging Face model directory with two prompt -> completion JSONL tasks: the
report's sweep (and, with corrupted prompts, its RESAMPLE sweep) equals ``freeze_sweep`` called directly with a
completion-only loss written by hand, and the report says what was scored."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from tests import builders
from tests.cli.helpers import SMALL, assert_complete_report, grid_from_csv, run_main, word_tokenizer
from tl_circuits import freeze_sweep
from tl_circuits.cli.loading import load_model

TASK_A = [("the cat sat on the", " mat", "the dog ran on a"), ("a big red bird", " sang", "the small blue cat"),
          ("the dog ran", " far", "a cat sat"), ("a small blue bird", " sang", "the big red dog"),
          ("the cat ran", " far", "a bird sat")]
TASK_B = [("the dog sat on a", " mat", "a cat ran on the"), ("a red cat", " sat", "the blue dog"),
          ("the big dog", " ran far", "a small cat"), ("a blue bird sat on the", " mat", "the red cat ran on a")]
# counted by hand (word tokenizer: one token per word, BOS first)
PROMPT_A, COMPLETION_A = [6, 5, 4, 5, 4], [1, 1, 1, 1, 1]
PROMPT_B, COMPLETION_B = [6, 4, 4, 7], [1, 1, 2, 1]


def write_task(path, rows, corrupted: bool = False):
    records = [dict(prompt=p, completion=c, **({"corrupted_prompt": x} if corrupted else {})) for p, c, x in rows]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def hand_loss_mask(prompts, completions, width):
    """Position p counts the prediction of token p + 1: the completion's tokens are n_prompt .. n_prompt + n - 1."""
    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, (n_prompt, n) in enumerate(zip(prompts, completions)):
        mask[row, n_prompt - 1:n_prompt - 1 + n] = True
    return mask


def completion_loss(tokens, mask):
    """Each sample's mean next-token cross-entropy over the masked predictions (the metric the report must use)."""
    def metric(logits):
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), tokens[:, 1:],
                                                reduction="none")
        counted = mask[:, :-1].to(nll.dtype)
        return (nll * counted).sum(1) / counted.sum(1)
    return metric


def tokenized_by_hand(tokenizer, rows):
    """(tokens, attention mask) of ``prompt + completion`` per record, by the tokenizer itself (BOS from its template),
    right-padded with its pad id."""
    ids = [tokenizer(p + c)["input_ids"] for p, c, _ in rows]
    width = max(map(len, ids))
    tokens = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in ids])
    return tokens, torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in ids])


@pytest.fixture(scope="module")
def hf_task_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("yours")
    tokenizer, _ = word_tokenizer()
    builders.save_hf_directory(root / "my-gpt2", "gpt2", tokenizer, seed=4)
    write_task(root / "a.jsonl", TASK_A, corrupted=True)
    write_task(root / "b.jsonl", TASK_B, corrupted=True)
    return root


@pytest.fixture(scope="module")
def hf_report(hf_task_inputs, tmp_path_factory):
    import contextlib
    import io

    root, out = hf_task_inputs, tmp_path_factory.mktemp("report") / "report"
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        status = run_main_quietly(["--model", root / "my-gpt2", "--task-a", root / "a.jsonl", "--task-b",
                                   root / "b.jsonl", "--replacement", "mean", *SMALL, "--out", out])
    return status, stderr.getvalue(), out


def run_main_quietly(args) -> int:
    from tl_circuits.cli.command import main

    return main([str(a) for a in args])


def test_the_report_says_what_was_scored(hf_report):
    status, stderr, out = hf_report
    assert status == 0 and stderr == ""
    assert_complete_report(out)
    samples = pd.read_csv(out / "samples.csv")
    a, b = samples[samples.task == "A"], samples[samples.task == "B"]
    assert a.id.tolist() == [f"a:{i}" for i in range(1, 6)] and b.id.tolist() == [f"b:{i}" for i in range(1, 5)]
    assert a.n_prompt.tolist() == PROMPT_A and a.n_completion.tolist() == COMPLETION_A
    assert b.n_prompt.tolist() == PROMPT_B and b.n_completion.tolist() == COMPLETION_B
    assert a.n_counted.tolist() == COMPLETION_A and b.n_counted.tolist() == COMPLETION_B
    assert a.preview.tolist()[0] == "the cat sat on the → mat"
    report = json.loads((out / "report.json").read_text())
    scoring = report["tasks"]["B"]["scoring"]
    assert scoring["n_prompt_tokens"] == PROMPT_B and scoring["n_completion_tokens"] == COMPLETION_B
    assert scoring["n_counted"] == COMPLETION_B and "completion" in scoring["counted"]
    assert scoring["corrupted_prompts"] is True and report["tasks"]["B"]["n_scored"] == sum(COMPLETION_B)
    assert report["model"]["source"] == "hugging_face" and report["model"]["dtype"] == "float32"
    markdown = (out / "report.md").read_text()
    assert "**Scored:**" in markdown and "completion 1–2 (mean 1.25) tokens" in markdown


def test_the_sweep_scores_the_completion_tokens(hf_task_inputs, hf_report):
    root = hf_task_inputs
    _, _, out = hf_report
    model = load_model(str(root / "my-gpt2"), "cpu").model
    tokenizer = model.tokenizer
    for key, rows, prompts, completions in (("A", TASK_A, PROMPT_A, COMPLETION_A),
                                            ("B", TASK_B, PROMPT_B, COMPLETION_B)):
        tokens, attention = tokenized_by_hand(tokenizer, rows)
        width = tokens.shape[1]
        mask = hand_loss_mask(prompts, completions, width)
        from tl_circuits.freezing.references import compute_mean_activations

        # the MEAN reference: the task's mean over its valid tokens (the right padding left out)
        reference = compute_mean_activations(model, tokens, progress=False, attention_mask=attention)
        sweep = freeze_sweep(model, tokens, completion_loss(tokens, mask), circuits=("qk", "ov", "both"),
                             per_sample=True, replacement="mean", reference=reference, progress=False)
        table = pd.read_csv(out / "sweep.csv")
        for circuit in ("qk", "ov"):
            rows_csv = table[(table.task == key) & (table.circuit == circuit)]
            np.testing.assert_allclose(grid_from_csv(rows_csv, "effect", (2, 4)), sweep.effect[circuit].numpy(),
                                       rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # a second whole run of the command (~15 s)
def test_resample_patches_each_sample_with_its_corrupted_twin(hf_task_inputs, tmp_path, capsys):
    root = hf_task_inputs
    out = tmp_path / "report"
    status, _, err = run_main(["--model", root / "my-gpt2", "--task-a", root / "a.jsonl", "--task-b",
                               root / "b.jsonl", "--replacement", "resample", *SMALL, "--out", out], capsys)
    assert status == 0 and not err
    model = load_model(str(root / "my-gpt2"), "cpu").model
    tokenizer = model.tokenizer
    clean = [tokenizer(p + c)["input_ids"] for p, c, _ in TASK_A]
    corrupted = [tokenizer(x + c)["input_ids"] for _, c, x in TASK_A]
    width = max(map(len, clean))

    def padded(rows):
        return torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in rows])

    tokens = padded(clean)
    sweep = freeze_sweep(model, tokens, completion_loss(tokens, hand_loss_mask(PROMPT_A, COMPLETION_A, width)),
                         circuits=("qk", "ov", "both"), per_sample=True, replacement="resample",
                         reference=padded(corrupted), progress=False)
    table = pd.read_csv(out / "sweep.csv")
    for circuit in ("qk", "ov", "both"):
        rows_csv = table[(table.task == "A") & (table.circuit == circuit)]
        np.testing.assert_allclose(grid_from_csv(rows_csv, "effect", (2, 4)), sweep.effect[circuit].numpy(),
                                   rtol=1e-4, atol=1e-6)


def test_resample_without_corrupted_prompts_is_one_line(hf_task_inputs, tmp_path, capsys):
    root = hf_task_inputs
    write_task(tmp_path / "plain.jsonl", TASK_A)
    status, _, err = run_main(["--model", root / "my-gpt2", "--task-a", tmp_path / "plain.jsonl", "--task-b",
                               root / "b.jsonl", "--replacement", "resample", *SMALL, "--out", tmp_path / "r"], capsys)
    assert status == 2 and len(err) == 1 and "task A" in err[0] and "corrupted_prompt" in err[0]


@pytest.mark.slow  # a whole run of the command in bfloat16 (~15 s)
def test_a_bfloat16_run_end_to_end(hf_task_inputs, hf_report, tmp_path, capsys):
    """The command on bfloat16 parameters: the report's numbers are finite and its interference map is close to the
    float32 run's (the gradients, Fisher and scores are accumulated in float32 or better)."""
    root = hf_task_inputs
    out = tmp_path / "report"
    status, _, err = run_main(["--model", root / "my-gpt2", "--dtype", "bfloat16", "--task-a", root / "a.jsonl",
                               "--task-b", root / "b.jsonl", "--replacement", "mean", *SMALL, "--out", out], capsys)
    assert status == 0 and not err
    assert json.loads((out / "report.json").read_text())["model"]["dtype"] == "bfloat16"
    half, full = pd.read_csv(out / "interference.csv"), pd.read_csv(hf_report[2] / "interference.csv")
    assert np.isfinite(half["mean"]).all()
    assert np.corrcoef(half["mean"], full["mean"])[0, 1] > 0.95


def test_the_map_scores_the_completion_tokens(hf_task_inputs, hf_report):
    """The report's map equals compute_interference with loss_mask_a/_b = the completion masks counted by hand (and
    not the all-token map), and report.json's settings say a loss mask was scored, with the hand counts."""
    from tl_circuits import InterferenceConfig, compute_interference

    root, (_, _, out) = hf_task_inputs, hf_report
    model = load_model(str(root / "my-gpt2"), "cpu").model
    tokenizer = model.tokenizer
    batches = []
    for rows, prompts, completions in ((TASK_A, PROMPT_A, COMPLETION_A), (TASK_B, PROMPT_B, COMPLETION_B)):
        tokens, attention = tokenized_by_hand(tokenizer, rows)
        batches.append((tokens, attention, hand_loss_mask(prompts, completions, tokens.shape[1])))
    (tokens_a, attention_a, counted_a), (tokens_b, attention_b, counted_b) = batches
    config = InterferenceConfig(variant="signed", fisher_source="pooled")
    masked = compute_interference(model, tokens_a, tokens_b, attention_mask_a=attention_a, attention_mask_b=attention_b,
                                  loss_mask_a=counted_a, loss_mask_b=counted_b, config=config, progress=False)
    every_token = compute_interference(model, tokens_a, tokens_b, attention_mask_a=attention_a,
                                       attention_mask_b=attention_b, config=config, progress=False)
    report = json.loads((out / "report.json").read_text())
    table = pd.read_csv(out / "interference.csv")
    for block in "QKVO":
        mean = grid_from_csv(table[table.block == block], "mean", masked.mean[block].shape)
        scale = float(masked.mean[block].abs().max())
        np.testing.assert_allclose(mean, masked.mean[block].numpy(), rtol=1e-4, atol=1e-5 * scale)
    assert max(float((masked.mean[b] - every_token.mean[b]).abs().max() / masked.mean[b].abs().max())
               for b in "QKVO") > 0.1  # far apart: the comparison above tells the conventions apart
    for key, completions in (("A", COMPLETION_A), ("B", COMPLETION_B)):
        loss = report["settings"]["loss"][key]
        assert loss["scored"] == "loss mask" and loss["counted_predictions"]["total"] == sum(completions)
