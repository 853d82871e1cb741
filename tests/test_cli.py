"""The ``tl-circuits`` command: the main job's report, its numbers against direct library calls, model and task
inputs (bundled, local checkpoint, pretrained name, text with a local tokenizer, token ids), one-line errors,
and all-or-nothing output."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tests import builders
from tl_circuits import InterferenceConfig, compute_interference, freeze_sweep
from tl_circuits.bundled import tasks
from tl_circuits.models.checkpoint import load_checkpoint, save_checkpoint
from tl_circuits.cli.command import CommandError, load_model, main
from tl_circuits.cli.report import FILES
from tl_circuits.stats.permutation import fdr_correction
from tl_circuits.cli.task_files import read_task_file

REPO = Path(__file__).resolve().parent.parent
SMALL = ["--n-permutations", "99", "--n-bootstrap", "50", "--quiet"]


def run_main(args, capsys) -> tuple[int, str, list[str]]:
    """(exit status, stdout, stderr lines) of an in-process run."""
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, [line for line in err.splitlines() if line.strip()]


def assert_complete_report(out: Path) -> None:
    """Every promised file exists, report.md embeds every PNG, and no partial directory is left beside it."""
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    markdown = (out / "report.md").read_text()
    embedded = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert sorted(embedded) == sorted(name for name in FILES if name.endswith(".png"))
    for name in embedded:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def grid_from_csv(frame: pd.DataFrame, column: str, shape) -> np.ndarray:
    grid = np.full(shape, np.nan)
    grid[frame["layer"].to_numpy(), frame["head"].to_numpy()] = frame[column].to_numpy()
    return grid


def json_grid(values) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)


# ----- inputs written to disk ------------------------------------------------------------------------

def write_ids(path: Path, rows) -> Path:
    path.write_text("\n".join(" ".join(str(int(t)) for t in row) for row in rows) + "\n")
    return path


def right_pad(rows, pad: int = 0):
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return tokens, mask


@pytest.fixture(scope="module")
def checkpoint_inputs(tmp_path_factory):
    """A tiny model saved as a local checkpoint, task A as a ragged .tokens file, task B as a .npy array."""
    root = tmp_path_factory.mktemp("inputs")
    model = builders.mha(seed=3)
    save_checkpoint(model, root / "model")
    gen = torch.Generator().manual_seed(5)
    rows_a = [torch.randint(0, 25, (int(n),), generator=gen).tolist() for n in (9, 5, 12, 7, 10, 6)]
    rows_b = torch.randint(25, builders.D_VOCAB, (5, 11), generator=gen)
    write_ids(root / "a.tokens", [[]] + rows_a[:3] + [[]] + rows_a[3:])  # blank lines are skipped
    np.save(root / "b.npy", rows_b.numpy())
    return dict(root=root, model=model, rows_a=rows_a, tokens_b=rows_b)


def word_tokenizer():
    """A word-level Hugging Face tokenizer built offline (prepends <bos>, pads with <pad>)."""
    from tokenizers import Tokenizer, processors
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    words = "the cat dog sat on mat ran far a big small red blue bird sang".split()
    vocab = {"<bos>": 0, "<pad>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<bos>",
                                   pad_token="<pad>", unk_token="<unk>"), len(vocab)


# ----- the main job on the bundled default model -------------------------------------------------------

@pytest.fixture(scope="module")
def bundled_report(tmp_path_factory):
    """The no-argument job, at small sizes, in process (and the inputs it used, rebuilt independently)."""
    from tl_circuits.bundled.models import DEFAULT_BUNDLED_MODEL, bundled_tasks, load_bundled_model

    out = tmp_path_factory.mktemp("bundled") / "report"
    assert main(["--n-a", "6", "--n-b", "5", "--seed", "3", *SMALL, "--out", str(out)]) == 0
    model = load_bundled_model(DEFAULT_BUNDLED_MODEL, "cpu")
    make_a, make_b = list(bundled_tasks(DEFAULT_BUNDLED_MODEL).values())[:2]
    batch_a, batch_b = make_a(6, 3), make_b(5, 4)  # seeds: --seed, --seed + 1
    direct = compute_interference(  # what the report's map must equal: the signed variant on the pooled Fisher
        model, batch_a.tokens, batch_b.tokens, ids_a=[f"{batch_a.name}#{i}" for i in range(6)],
        ids_b=[f"{batch_b.name}#{j}" for j in range(5)],
        config=InterferenceConfig(variant="signed", fisher_source="pooled", progress=False))
    return dict(out=out, model=model, batch_a=batch_a, batch_b=batch_b, interference=direct)


def test_main_job_writes_every_promised_file(bundled_report):
    out = bundled_report["out"]
    assert_complete_report(out)
    data = json.loads((out / "report.json").read_text())
    assert data["model"]["source"] == "bundled" and data["tasks"]["A"]["n_samples"] == 6
    assert data["tasks"]["B"]["n_samples"] == 5 and data["statistics"]["settings"]["n_permutations"] == 99
    markdown = (out / "report.md").read_text()
    for heading in ("## Freeze sweep", "## Interference between task A and task B", "## Top conflicting sample pairs"):
        assert heading in markdown


def test_sweep_numbers_equal_freeze_sweep_called_directly(bundled_report):
    out, model = bundled_report["out"], bundled_report["model"]
    sweep_csv = pd.read_csv(out / "sweep.csv")
    data = json.loads((out / "report.json").read_text())
    for task, batch in (("A", bundled_report["batch_a"]), ("B", bundled_report["batch_b"])):
        direct = freeze_sweep(model, batch.tokens, tasks.scored_loss_metric(batch), progress=False)
        assert data["sweep"][task]["clean"] == pytest.approx(direct.clean, rel=1e-6)
        for circuit in ("qk", "ov"):
            rows = sweep_csv[(sweep_csv.task == task) & (sweep_csv.circuit == circuit)]
            from_csv = grid_from_csv(rows, "effect", direct.effect[circuit].shape)
            np.testing.assert_allclose(from_csv, direct.effect[circuit].numpy(), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(from_csv, json_grid(data["sweep"][task]["effect"][circuit]), rtol=1e-12)


def test_interference_numbers_equal_compute_interference_called_directly(bundled_report):
    out, direct = bundled_report["out"], bundled_report["interference"]
    table = pd.read_csv(out / "interference.csv")
    data = json.loads((out / "report.json").read_text())
    for block in "QKVO":
        rows = table[table.block == block]
        mean = grid_from_csv(rows, "mean", direct.mean[block].shape)
        scale = float(direct.mean[block].abs().max())
        np.testing.assert_allclose(mean, direct.mean[block].numpy(), rtol=1e-4, atol=1e-5 * scale)
        np.testing.assert_allclose(mean, json_grid(data["interference"]["mean"][block]), rtol=1e-12)
        # the map and the test's observed statistic come from one matrix
        np.testing.assert_allclose(mean, grid_from_csv(rows, "observed", mean.shape), rtol=1e-5, atol=1e-6 * scale)
        np.testing.assert_allclose(grid_from_csv(rows, "q_value_bh", mean.shape),
                                   json_grid(data["statistics"]["q_value_bh"][block]), rtol=1e-12)
    top = pd.read_csv(out / "top_conflicts.csv").iloc[0]
    expected = direct.top_conflicts(1)[0]
    assert (top.id_a, top.id_b, top.block, top.layer, top["head"]) == tuple(expected)[:5]
    assert top.score == pytest.approx(expected.score, rel=1e-4)


def test_statistics_columns_are_consistent(bundled_report):
    table = pd.read_csv(bundled_report["out"] / "interference.csv")
    p = table.p_value.to_numpy()
    assert ((p >= 1 / 100) & (p <= 1)).all()
    q = fdr_correction({"all": torch.tensor(p)[None]}, "bh")["all"][0].numpy()
    np.testing.assert_allclose(table.q_value_bh.to_numpy(), q, rtol=1e-12)
    assert (table.significant == (table.q_value_bh <= 0.05)).all()
    assert (table.ci_low <= table.ci_high).all()


def test_top_pairs_are_the_most_negative_pair_totals(bundled_report):
    out, direct = bundled_report["out"], bundled_report["interference"]
    totals = sum(s.double().sum(dim=(2, 3)) for s in direct.scores.values())
    pairs = pd.read_csv(out / "top_pairs.csv")
    assert len(pairs) == min(10, totals.numel())
    i, j = divmod(int(totals.argmin()), totals.shape[1])
    assert (pairs.id_a[0], pairs.id_b[0]) == (direct.ids_a[i], direct.ids_b[j])
    assert pairs.total[0] == pytest.approx(float(totals[i, j]), rel=1e-4)
    assert (np.diff(pairs.total.to_numpy()) >= 0).all()  # most negative first
    markdown = (out / "report.md").read_text()
    assert f"| 1 | {pairs.id_a[0]} | {pairs.id_b[0]} |" in markdown


def test_report_names_the_top_heads(bundled_report):
    out = bundled_report["out"]
    sweep_csv = pd.read_csv(out / "sweep.csv")
    top = sweep_csv[sweep_csv.task == "A"].iloc[sweep_csv[sweep_csv.task == "A"].effect.abs().argmax()]
    markdown = (out / "report.md").read_text()
    assert f"| A | {top.circuit} | {top.layer} | {top['head']} |" in markdown
    table = pd.read_csv(out / "interference.csv")
    worst = table.iloc[table["mean"].argmin()]
    assert f"| {worst.block} | {worst.layer} | {worst['head']} |" in markdown
    # rows of known heads carry their role from the model's metadata, and only those rows do
    from tl_circuits.bundled.models import DEFAULT_BUNDLED_MODEL, bundled_model_info

    roles = {}
    for role, heads in bundled_model_info(DEFAULT_BUNDLED_MODEL).known_heads.items():
        for layer, head in heads:
            roles.setdefault((layer, head), []).append(role)
    data = json.loads((out / "report.json").read_text())
    for row in data["top_heads_by_freeze"] + data["top_heads_by_interference"]:
        assert row["known_role"] == ", ".join(roles.get((row["layer"], row["head"]), []))


def test_list_models_names_every_bundled_model(capsys):
    from tl_circuits.bundled.models import DEFAULT_BUNDLED_MODEL, list_bundled_models

    status, out, err = run_main(["--list-models"], capsys)
    assert status == 0 and not err
    for info in list_bundled_models():
        assert info.name in out
    assert f"{DEFAULT_BUNDLED_MODEL} (default)" in out


@pytest.mark.slow
def test_no_argument_run_at_default_sizes(tmp_path, monkeypatch):
    """The README's first command, exactly: no arguments, in a fresh directory."""
    monkeypatch.chdir(tmp_path)
    assert main([]) == 0
    assert_complete_report(tmp_path / "tl_circuits_report")
    data = json.loads((tmp_path / "tl_circuits_report" / "report.json").read_text())
    assert data["tasks"]["A"]["n_samples"] == 64 and data["tasks"]["B"]["n_samples"] == 64
    n_cells = sum(len(grid) * len(grid[0]) for grid in data["statistics"]["observed"].values())
    assert data["statistics"]["settings"]["n_permutations"] == max(1000, int(np.ceil(2 * n_cells / 0.05)))


# ----- local checkpoint, token files and text --------------------------------------------------------

def test_checkpoint_docstring_example_runs():
    import doctest

    import tl_circuits.models.checkpoint

    failures, tried = doctest.testmod(tl_circuits.models.checkpoint, verbose=False)
    assert tried >= 4 and failures == 0


def test_checkpoint_round_trip_is_exact(tmp_path):
    model = builders.gqa(seed=2)
    tokens = builders.random_tokens()
    for fmt in ("safetensors", "pt"):
        save_checkpoint(model, tmp_path / fmt, weights_format=fmt)
        loaded = load_checkpoint(tmp_path / fmt)
        assert loaded.cfg.n_key_value_heads == 2 and loaded.tokenizer is None
        torch.testing.assert_close(loaded(tokens), model(tokens), rtol=0, atol=0)
    assert load_model(str(tmp_path / "pt"), "cpu").source == "checkpoint"


@pytest.fixture(scope="module")
def checkpoint_report(checkpoint_inputs, tmp_path_factory):
    """(exit status, stdout, stderr, report folder) of a quiet run on the local checkpoint and token files."""
    import contextlib
    import io

    root = checkpoint_inputs["root"]
    out = tmp_path_factory.mktemp("checkpoint") / "report"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = main([str(a) for a in ["--model", root / "model", "--task-a", root / "a.tokens", "--task-b",
                                        root / "b.npy", "--n-a", "5", *SMALL, "--out", out]])
    return status, stdout.getvalue(), stderr.getvalue(), out


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
                                  config=InterferenceConfig(variant="signed", fisher_source="pooled", progress=False))
    table = pd.read_csv(out / "interference.csv")
    for block in "QKVO":
        mean = grid_from_csv(table[table.block == block], "mean", direct.mean[block].shape)
        np.testing.assert_allclose(mean, direct.mean[block].numpy(), rtol=1e-4,
                                   atol=1e-5 * float(direct.mean[block].abs().max()))

    def loss_on_real_tokens(logits):  # padding must not count: targets whose predecessor and self are real
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), tokens_a[:, 1:], reduction="none")
        valid = (mask_a[:, 1:] * mask_a[:, :-1]).bool()
        return nll[valid].mean()

    sweep = freeze_sweep(model, tokens_a, loss_on_real_tokens, progress=False)
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
        assert task.tokens.tolist() == [[1, 2, 3]] and task.ids == ["t[0]"]
    write_ids(tmp_path / "long.tokens", [list(range(1, builders.N_CTX + 5)), [1, 2]])
    long = read_task_file(tmp_path / "long.tokens", model)
    assert long.tokens.shape == (2, builders.N_CTX) and "1 sample(s) truncated" in long.notes[0]


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
                                  "a one-token sample", "a task of one sample", "float token array", "unknown model",
                                  "directory that is not a checkpoint", "weights that do not fit the config",
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


# ----- all or nothing ----------------------------------------------------------------------------------

def checkpoint_args(inputs, out) -> list:
    root = inputs["root"]
    return ["--model", root / "model", "--task-a", root / "a.tokens", "--task-b", root / "b.npy", *SMALL, "--out", out]


def test_failure_while_writing_leaves_no_report(checkpoint_inputs, tmp_path, capsys, monkeypatch):
    import tl_circuits.cli.report as report

    real_write_figures = report.write_figures

    def write_some_then_fail(analysis, directory):
        real_write_figures(analysis, directory)  # CSVs, JSON and PNGs are on disk by now, report.md is not
        assert (directory / "report.json").exists() and (directory / "interference.png").exists()
        raise RuntimeError("disk full")

    monkeypatch.setattr(report, "write_figures", write_some_then_fail)
    out = tmp_path / "report"
    status, _, err = run_main(checkpoint_args(checkpoint_inputs, out), capsys)
    assert status == 1 and len(err) == 1 and "RuntimeError: disk full; no report written" in err[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither the report nor a partial directory


def test_failure_mid_analysis_keeps_an_earlier_report_intact(checkpoint_inputs, checkpoint_report, tmp_path, capsys,
                                                              monkeypatch):
    import shutil

    import tl_circuits.cli.report as report

    out = tmp_path / "report"
    shutil.copytree(checkpoint_report[3], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "permutation_test", interrupted)
    status, _, err = run_main(checkpoint_args(checkpoint_inputs, out), capsys)
    assert status == 130 and err == ["tl-circuits: interrupted; no report written"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]


def test_rerun_replaces_an_earlier_report_with_progress_unless_quiet(checkpoint_inputs, checkpoint_report, tmp_path,
                                                                     capsys):
    import shutil

    out = tmp_path / "report"
    shutil.copytree(checkpoint_report[3], out)
    args = [a for a in checkpoint_args(checkpoint_inputs, out) if a != "--quiet"]
    status, _, err = run_main([*args, "--seed", "1"], capsys)
    text = "\n".join(err)
    assert status == 0
    for stage in ("model model (checkpoint) on cpu", "freeze sweep on task A", "per-sample gradients", "report written to"):
        assert stage in text
    assert "permutation test:" in text and "%|" in text  # tqdm bars
    # the earlier report is replaced and nothing else is left behind
    assert json.loads((out / "report.json").read_text())["settings"]["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]
    assert_complete_report(out)


# ----- entry points ------------------------------------------------------------------------------------

def test_help_lists_every_option(capsys):
    status, stdout, err = run_main(["--help"], capsys)
    assert status == 0 and stdout.startswith("usage: tl-circuits") and not err
    for option in ("--model", "--task-a", "--task-b", "--n-a", "--n-b", "--n-permutations", "--device", "--seed",
                   "--out", "--quiet", "--list-models"):
        assert option in stdout


def test_console_script_entry_point():
    """pyproject declares ``tl-circuits = tl_circuits.cli.command:main``; where the package is installed (CI installs it
    with ``pip install -e .``), the generated script runs it."""
    import shutil
    import sysconfig

    import tl_circuits.cli.command

    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"tl-circuits": "tl_circuits.cli:main"}
    module, _, function = scripts["tl-circuits"].partition(":")
    assert getattr(__import__(module, fromlist=[function]), function) is tl_circuits.cli.command.main
    script = shutil.which("tl-circuits", path=sysconfig.get_path("scripts"))
    if script is None:
        pytest.skip("tl_circuits is not installed with its console script here: run `pip install -e .`")
    proc = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: tl-circuits")
