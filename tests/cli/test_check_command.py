"""``tl-circuits --check``: the sanity check's table on stdout; exit 0 when every check passes, 1 when one fails or
the model is refused, 2 on bad input."""

from __future__ import annotations

import pytest

from tests.architectures import zoo
from tests.cli.helpers import run_main
from tl_circuits.checks import CHECKS
from tl_circuits.models import layout


def test_check_of_the_bundled_default_passes(capsys):
    status, out, err = run_main(["--check"], capsys)
    assert status == 0, out + "\n".join(err)
    assert "passed (all 6 checks)" in out
    for name in CHECKS:
        assert f"\n{name} " in out
    assert "FAIL" not in out


def test_check_of_a_checkpoint_directory_passes(checkpoint_inputs, capsys):
    status, out, _ = run_main(["--check", "--model", checkpoint_inputs["root"] / "model", "--seed", "3"], capsys)
    assert status == 0, out
    assert "(checkpoint)" in out and "passed" in out


def test_a_failing_check_exits_1_and_says_which(monkeypatch, capsys):
    original = layout.weight_to_heads
    monkeypatch.setattr(layout, "weight_to_heads", lambda w, block, lay, heads: (
        original(w, block, lay, heads).roll(1, dims=-3) if block == "O" else original(w, block, lay, heads)))
    status, out, _ = run_main(["--check", "--model", "induction-2l"], capsys)
    assert status == 1
    assert "FAILED (1 of 6 checks failed)" in out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("o_columns")] == ["FAIL"]


def test_a_refused_model_exits_1_with_the_reason(monkeypatch, capsys):
    import tl_circuits.cli.command as command
    from tl_circuits.cli.loading import LoadedModel

    model = zoo.refused_bridge(pytest)
    monkeypatch.setattr(command, "load_model", lambda name, device, bridge=False: LoadedModel(
        model, "codegen", "pretrained"))
    status, out, _ = run_main(["--check", "--model", "codegen"], capsys)
    assert status == 1
    assert "REFUSED" in out and "CodeGenForCausalLM" in out


@pytest.mark.parametrize("args, phrase", [
    (["--model", "{tmp}"], "not a checkpoint directory"),
    (["--device", "nonsense"], "is not a torch device"),
])
def test_bad_input_exits_2_with_one_line(args, phrase, tmp_path, capsys):
    status, out, err = run_main(["--check", *[a.format(tmp=tmp_path) for a in args]], capsys)
    assert status == 2 and out == ""
    assert len(err) == 1 and phrase in err[0], err
