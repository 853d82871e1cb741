"""The ``tl-circuits`` command's inputs: a local checkpoint, token files, text with a local tokenizer, pretrained
names, and bad input (one line, exit status 2, nothing written)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests import builders
from tests.cli.helpers import (
    REPO,
    SMALL,
    assert_complete_report,
    grid_from_csv,
    right_pad,
    run_main,
    word_tokenizer,
    write_ids,
)
from tl_circuits import InterferenceConfig, compute_interference, freeze_sweep
from tl_circuits.cli.loading import CommandError, load_model
from tl_circuits.cli.task_files import TaskInputError, read_task_file
from tl_circuits.models.checkpoint import load_checkpoint, save_checkpoint



# ----- local checkpoint, token files and text --------------------------------------------------------

@pytest.mark.needs_hooked_transformer  # the docstring saves a HookedTransformer
def test_checkpoint_docstring_example_runs():
    import doctest

    import tl_circuits.models.checkpoint

    failures, tried = doctest.testmod(tl_circuits.models.checkpoint, verbose=False)
    assert tried >= 4 and failures == 0


@pytest.mark.needs_hooked_transformer  # save_checkpoint writes HookedTransformers only
def test_checkpoint_round_trip_is_exact(tmp_path):
    model = builders.gqa(seed=2)
    tokens = builders.random_tokens()
    for fmt in ("safetensors", "pt"):
        save_checkpoint(model, tmp_path / fmt, weights_format=fmt)
        loaded = load_checkpoint(tmp_path / fmt)
        assert loaded.cfg.n_key_value_heads == 2 and loaded.tokenizer is None
        torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)
    assert load_model(str(tmp_path / "pt"), "cpu").source == "checkpoint"



def test_checkpoint_with_token_files_matches_direct_calls(checkpoint_inputs, checkpoint_report):
    model = checkpoint_inputs["model"]
    status, stdout, stderr, out = checkpoint_report
    assert (status, stdout, stderr) == (0, "", "")  # --quiet: nothing at all
    assert_complete_report(out)
    samples = pd.read_csv(out / "samples.csv")
    assert samples[samples.task == "A"].id.tolist() == ["a:2", "a:3", "a:4", "a:6", "a:7"]  # file line numbers
    tokens_a, mask_a = right_pad(checkpoint_inputs["rows_a"][:5])
    tokens_b = checkpoint_inputs["tokens_b"]
    direct = compute_interference(model, tokens_a, tokens_b, attention_mask_a=mask_a,
                                  config=InterferenceConfig(variant="signed", fisher_source="pooled"), progress=False)
    table = pd.read_csv(out / "interference.csv")
    for block in "QKVO":
        mean = grid_from_csv(table[table.block == block], "mean", direct.mean[block].shape)
        np.testing.assert_allclose(mean, direct.mean[block].numpy(), rtol=1e-4,
                                   atol=1e-5 * float(direct.mean[block].abs().max()))

    def loss_on_real_tokens(logits):  # per sample; padding must not count: targets whose predecessor and self are real
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), tokens_a[:, 1:], reduction="none")
        valid = (mask_a[:, 1:] * mask_a[:, :-1]).to(nll.dtype)
        return (nll * valid).sum(1) / valid.sum(1)

    sweep = freeze_sweep(model, tokens_a, loss_on_real_tokens, per_sample=True, progress=False)
    sweep_csv = pd.read_csv(out / "sweep.csv")
    rows = sweep_csv[(sweep_csv.task == "A") & (sweep_csv.circuit == "ov")]
    np.testing.assert_allclose(grid_from_csv(rows, "effect", (2, 4)), sweep.effect["ov"].numpy(), rtol=1e-4, atol=1e-6)


def test_token_file_formats_agree(checkpoint_inputs, tmp_path):
    """.tokens lines, a .txt read with fmt="ids", a .pt tensor, a .pt dict with a mask and a .npy array give the
    same samples; rows longer than n_ctx are truncated with a note."""
    model = checkpoint_inputs["model"]
    rows = [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12]]
    tokens, mask = right_pad(rows)
    write_ids(tmp_path / "t.tokens", rows)
    write_ids(tmp_path / "t.txt", rows)
    torch.save({"tokens": tokens, "attention_mask": mask}, tmp_path / "d.pt")
    readings = [read_task_file(tmp_path / "t.tokens", model), read_task_file(tmp_path / "t.txt", model, fmt="ids"),
                read_task_file(tmp_path / "d.pt", model)]
    for task in readings:
        assert torch.equal(task.tokens, tokens) and torch.equal(task.attention_mask, mask)
        assert task.scored.sum(1).tolist() == [4, 2, 3] and not task.scored[:, -1].any()
    torch.save(tokens[:2, :3], tmp_path / "t.pt")
    np.save(tmp_path / "t.npy", tokens[:2, :3].numpy())
    for name in ("t.pt", "t.npy"):
        task = read_task_file(tmp_path / name, model, max_samples=1)
        assert task.tokens.tolist() == [[1, 2, 3]] and task.ids == ["t:1"]  # 1-based row number, as lines
    write_ids(tmp_path / "long.tokens", [list(range(1, builders.N_CTX + 5)), [1, 2]])
    long = read_task_file(tmp_path / "long.tokens", model)
    assert long.tokens.shape == (2, builders.N_CTX) and "1 sample(s) truncated" in long.notes[0]


@pytest.mark.needs_hooked_transformer  # saves a HookedTransformer checkpoint with a tokenizer
def test_text_tasks_are_tokenised_by_the_checkpoint_tokenizer(tmp_path, capsys):
    tokenizer, d_vocab = word_tokenizer()
    model = builders.hooked(seed=4, d_vocab=d_vocab)
    save_checkpoint(model, tmp_path / "model", tokenizer=tokenizer)
    (tmp_path / "a.txt").write_text("the cat sat on the mat\nthe dog ran far\n\na big red bird sang\nthe cat ran\n")
    (tmp_path / "b.txt").write_text("blue bird\nsmall dog sat on a big mat\nthe red cat sang far\n")
    loaded = load_checkpoint(tmp_path / "model")
    task = read_task_file(tmp_path / "a.txt", loaded)
    expected = [tokenizer(line)["input_ids"] for line in ("the cat sat on the mat", "the dog ran far",
                                                          "a big red bird sang", "the cat ran")]
    tokens, mask = right_pad(expected, pad=tokenizer.pad_token_id)
    assert torch.equal(task.tokens, tokens) and torch.equal(task.attention_mask, mask)
    assert task.previews[2] == "a big red bird sang" and task.ids[2] == "a:4"
    # scored positions: a prediction counts when it and its target are real tokens
    assert task.scored.sum(1).tolist() == [len(e) - 1 for e in expected]
    out = tmp_path / "report"
    status, _, err = run_main(["--model", tmp_path / "model", "--task-a", tmp_path / "a.txt", "--task-b",
                               tmp_path / "b.txt", *SMALL, "--out", out], capsys)
    assert status == 0 and not err
    assert_complete_report(out)
    samples = pd.read_csv(out / "samples.csv")
    assert samples.preview.tolist()[-3:] == ["blue bird", "small dog sat on a big mat", "the red cat sang far"]


@pytest.mark.needs_hooked_transformer  # HookedTransformer.from_pretrained
def test_pretrained_names_go_to_from_pretrained(monkeypatch):
    from transformer_lens import HookedTransformer

    calls = []

    def fake_from_pretrained(name, device=None, **kwargs):
        calls.append((name, device))
        return builders.mha()

    monkeypatch.setattr(HookedTransformer, "from_pretrained", staticmethod(fake_from_pretrained))
    loaded = load_model("gpt2", "cpu")
    assert calls == [("gpt2", "cpu")] and loaded.source == "pretrained" and loaded.name == "gpt2"

    def offline(name, device=None, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore detail")

    monkeypatch.setattr(HookedTransformer, "from_pretrained", staticmethod(offline))
    with pytest.raises(CommandError, match="cannot load pretrained model 'gpt2'.*couldn't connect"):
        load_model("gpt2", "cpu")
    import logging

    assert logging.root.manager.disable == logging.NOTSET  # the hub's retry logging is silenced only during the load


# ----- bad input: non-zero exit, one line, nothing written -------------------------------------------

def bad_inputs(root: Path, tmp: Path) -> dict:
    (tmp / "empty.txt").write_text("\n  \n")
    (tmp / "oov.tokens").write_text("1 2 3\n4 5 999\n")
    (tmp / "words.tokens").write_text("1 2 3\nthe cat\n")
    (tmp / "short.tokens").write_text("1 2 3\n7\n")
    (tmp / "text.txt").write_text("the cat sat\n")
    (tmp / "not_a_model").mkdir()
    np.save(tmp / "floats.npy", np.random.rand(3, 5))
    import shutil

    shutil.copytree(root / "model", tmp / "mismatched")
    config = json.loads((tmp / "mismatched" / "config.json").read_text())
    (tmp / "mismatched" / "config.json").write_text(json.dumps({**config, "d_mlp": config["d_mlp"] * 2}))
    shutil.copytree(root / "model", tmp / "broken")
    (tmp / "broken" / "config.json").write_text("{not json")
    (tmp / "occupied").mkdir()
    (tmp / "occupied" / "thesis.tex").write_text("keep me")
    model, a, b = ["--model", root / "model"], ["--task-a", root / "a.tokens"], ["--task-b", root / "b.npy"]
    return {
        "missing task file": ([*model, "--task-a", tmp / "nope.txt", *b], "nope.txt: no such file"),
        "empty task": ([*model, "--task-a", tmp / "empty.txt", *b], "empty task"),
        "ids outside the vocabulary": ([*model, "--task-a", tmp / "oov.tokens", *b], "oov.tokens:2: token id 999"),
        "text for a model without a tokenizer": ([*model, "--task-a", tmp / "text.txt", *b], "has no tokenizer"),
        "words in a token-id file": ([*model, "--task-a", tmp / "words.tokens", *b], "words.tokens:2: expected"),
        "a one-token sample": ([*model, "--task-a", tmp / "short.tokens", *b], "short.tokens:2"),
        "a task of one sample": ([*model, *a, *b, "--n-b", "1"], "task B has 1 sample"),
        "float token array": ([*model, "--task-a", tmp / "floats.npy", *b], "must be integers"),
        "unknown model": (["--model", "no-such-model", *a, *b], "unknown model 'no-such-model'"),
        "directory that is not a checkpoint": (["--model", tmp / "not_a_model", *a, *b], "not a checkpoint"),
        "weights that do not fit the config": (["--model", tmp / "mismatched", *a, *b], "weights do not match"),
        "unreadable config.json": (["--model", tmp / "broken", *a, *b], "not a readable JSON file"),
        "only one task file": ([*model, *a], "both --task-a and --task-b"),
        "checkpoint without bundled tasks": (model, "has no bundled tasks"),
        "occupied output directory": ([*model, *a, *b, "--out", tmp / "occupied"], "not a tl-circuits report"),
        "bad option value": ([*model, *a, *b, "--alpha", "2"], "--alpha"),
        "unknown option": (["--modle", "x"], "unrecognized arguments"),
    }


@pytest.mark.parametrize("case", ["missing task file", "empty task", "ids outside the vocabulary",
                                  "text for a model without a tokenizer", "words in a token-id file",
                                  "a one-token sample", "a task of one sample", "float token array",
                                  # the messages of a pretrained name and of a HookedTransformer load_state_dict:
                                  pytest.param("unknown model", marks=pytest.mark.needs_hooked_transformer),
                                  "directory that is not a checkpoint",
                                  pytest.param("weights that do not fit the config",
                                               marks=pytest.mark.needs_hooked_transformer),
                                  "unreadable config.json", "only one task file",
                                  "checkpoint without bundled tasks", "occupied output directory",
                                  "bad option value", "unknown option"])
def test_bad_input_exits_with_one_line(case, checkpoint_inputs, tmp_path, capsys):
    args, message = bad_inputs(checkpoint_inputs["root"], tmp_path)[case]
    if "--out" not in args:
        args = [*args, "--out", tmp_path / "report"]
    status, stdout, err = run_main([*args, "--quiet"], capsys)
    assert status == 2 and stdout == ""
    assert len(err) == 1 and err[0].startswith("tl-circuits: error: ") and message in err[0], err
    assert not (tmp_path / "report").exists()
    assert (tmp_path / "occupied" / "thesis.tex").read_text() == "keep me"


def test_python_dash_m_reports_bad_input_in_one_line_without_traceback(checkpoint_inputs, tmp_path):
    """``python -m tl_circuits`` in a real process (its __main__), not quiet, the model already loaded when the
    task is found bad: still exactly one line, and no report."""
    root = checkpoint_inputs["root"]
    (tmp_path / "oov.tokens").write_text(f"1 2 {builders.D_VOCAB}\n")
    proc = subprocess.run([sys.executable, "-m", "tl_circuits", "--model", str(root / "model"), "--task-a",
                           str(tmp_path / "oov.tokens"), "--task-b", str(root / "b.npy"), "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                          timeout=300)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"tl-circuits: error: {tmp_path / 'oov.tokens'}:1: token id {builders.D_VOCAB} is outside the model's "
        f"vocabulary [0, {builders.D_VOCAB - 1}]"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["oov.tokens"]



@pytest.mark.needs_hooked_transformer  # saves a HookedTransformer checkpoint with a tokenizer
def test_unknown_words_in_a_text_task_are_an_error_that_names_them(tmp_path):
    """A word the tokenizer does not know would become its unknown token (here BOS) while samples.csv still showed
    the word: it is an error naming the words and the line."""
    tokenizer, d_vocab = word_tokenizer()
    model = builders.hooked(seed=4, d_vocab=d_vocab)
    save_checkpoint(model, tmp_path / "model", tokenizer=tokenizer)
    (tmp_path / "a.txt").write_text("the cat sat on the mat\nthe zebra sat on the quokka\n")
    loaded = load_checkpoint(tmp_path / "model")
    with pytest.raises(TaskInputError, match=r"a\.txt:2: 2 token\(s\) .*'zebra', 'quokka'"):
        read_task_file(tmp_path / "a.txt", loaded)


@pytest.mark.needs_hooked_transformer  # saves a HookedTransformer checkpoint with a tokenizer
def test_the_same_sequences_as_text_ids_and_tensor_give_the_same_samples(tmp_path):
    """Text gets BOS from to_tokens; token files are used as given: the same sequences (text, and its ids with
    BOS written out) give the same tokens, mask, scored positions and ids in every format."""
    tokenizer, d_vocab = word_tokenizer()
    model = builders.hooked(seed=4, d_vocab=d_vocab)
    save_checkpoint(model, tmp_path / "model", tokenizer=tokenizer)
    loaded = load_checkpoint(tmp_path / "model")
    lines = ["the cat sat on the mat", "a big bird", "the dog ran far"]
    rows = [tokenizer(line)["input_ids"] for line in lines]  # independent of to_tokens: the tokenizer itself
    assert all(row[0] == tokenizer.bos_token_id for row in rows)
    (tmp_path / "text").mkdir(), (tmp_path / "ids").mkdir(), (tmp_path / "tensor").mkdir()
    (tmp_path / "text" / "task.txt").write_text("\n".join(lines) + "\n")
    write_ids(tmp_path / "ids" / "task.tokens", rows)
    tokens, mask = right_pad(rows, pad=tokenizer.pad_token_id)
    torch.save({"tokens": tokens, "attention_mask": mask}, tmp_path / "tensor" / "task.pt")
    readings = [read_task_file(tmp_path / folder / name, loaded)
                for folder, name in (("text", "task.txt"), ("ids", "task.tokens"), ("tensor", "task.pt"))]
    for task in readings:
        assert torch.equal(task.tokens, tokens) and torch.equal(task.attention_mask, mask)
        assert torch.equal(task.scored, readings[0].scored)
        assert task.ids == ["task:1", "task:2", "task:3"] and task.notes == []


@pytest.mark.needs_hooked_transformer  # saves a HookedTransformer checkpoint with a tokenizer
def test_token_rows_without_bos_are_kept_as_given_with_a_note(tmp_path):
    tokenizer, d_vocab = word_tokenizer()
    model = builders.hooked(seed=4, d_vocab=d_vocab)
    save_checkpoint(model, tmp_path / "model", tokenizer=tokenizer)
    loaded = load_checkpoint(tmp_path / "model")
    rows = [[5, 6, 7], [0, 5, 6]]
    write_ids(tmp_path / "a.tokens", rows)
    np.save(tmp_path / "a.npy", np.array(rows))
    for name in ("a.tokens", "a.npy"):
        task = read_task_file(tmp_path / name, loaded)
        assert task.tokens.tolist() == rows  # nothing prepended
        assert len(task.notes) == 1 and "1 of 2 sample(s) do not start with BOS (id 0)" in task.notes[0]
    write_ids(tmp_path / "b.tokens", [[0, 5, 6], [0, 7]])
    assert read_task_file(tmp_path / "b.tokens", loaded).notes == []
    tokenless = builders.hooked(seed=4, d_vocab=d_vocab)  # no tokenizer: no BOS convention to compare with
    assert read_task_file(tmp_path / "a.tokens", tokenless).notes == []
