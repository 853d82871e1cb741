"""The pytest plugin (pytest_tl_circuits), run by pytester: the documented example passes, a false claim and a model
left changed fail with the documented messages, the marks, options and skips do what docs/testing.md says, and
loading the plugin imports nothing heavy and changes nothing for a project that does not use it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from tl_circuits.testing import has_hooked_transformer

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ("-p", "pytest_tl_circuits", "-p", "no:cacheprovider")


def _documented(marker: str) -> list[str]:
    """The lines of the ```text block after ``<!-- marker -->`` in docs/testing.md, as fnmatch patterns of pytest's
    ``E   ...`` lines: decimals and hook handles may differ in their digits; everything else is literal."""
    text = (ROOT / "docs" / "testing.md").read_text()
    block = text.split(f"<!-- {marker} -->", 1)[1].split("```text\n", 1)[1].split("```", 1)[0]
    patterns = []
    for line in block.strip().splitlines():
        line = re.sub(r"\d+\.\d+", "\0", re.sub(r"\(handle \d+\)", "(handle \0)", line)).replace("[", "[[]")
        patterns.append("E *" + line.strip().replace("\0", "*"))
    return patterns


@pytest.fixture
def in_path(monkeypatch):
    """Subprocesses find the checkout's tl_circuits and plugin first (as in-process runs do)."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))


def test_the_documented_example_passes(pytester):
    pytester.makepyfile(test_my_circuit=(ROOT / "examples" / "test_my_circuit.py").read_text())
    result = pytester.runpytest(*PLUGIN)
    result.assert_outcomes(passed=6)


def test_a_false_claim_fails_with_the_documented_message(pytester):
    pytester.makepyfile(test_false_claim="""
        import pytest
        from tl_circuits.testing import assert_freeze_effect

        @pytest.mark.tlc_bundled("induction-2l")
        def test_an_unrelated_head_matters(tlc_bundled_model, tlc_task_batch):
            assert_freeze_effect(tlc_bundled_model, [(0, 1)], tlc_task_batch("induction", 16), at_least=1.0)
    """)
    result = pytester.runpytest(*PLUGIN)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(_documented("false-claim-output"), consecutive=True)


def test_a_model_left_changed_by_user_code_is_caught(pytester):
    pytester.makepyfile(test_leak="""
        from tl_circuits.testing import assert_model_unchanged

        def my_analysis(model):
            model.blocks[0].attn.hook_pattern.add_hook(lambda pattern, hook: pattern)  # never removed

        def test_my_analysis_leaves_the_model_alone(tlc_bundled_model):
            with assert_model_unchanged(tlc_bundled_model):
                my_analysis(tlc_bundled_model)
    """)
    result = pytester.runpytest(*PLUGIN)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(_documented("model-changed-output"), consecutive=True)


def test_architectures_follow_the_option_the_mark_and_explicit_parameters(pytester):
    pytester.makepyfile(test_archs="""
        import pytest

        @pytest.mark.tlc_architectures(features=["gqa"])
        def test_gqa(tlc_architecture):
            pass

        @pytest.mark.tlc_architectures("BloomForCausalLM", "OPTForCausalLM")
        def test_named(tlc_architecture):
            pass

        @pytest.mark.parametrize("tlc_architecture", ["Qwen2ForCausalLM"])
        def test_mine(tlc_architecture):
            pass
    """)
    result = pytester.runpytest(*PLUGIN, "--collect-only", "-q", "--tlc-architectures=representative")
    assert sorted(line for line in result.outlines if "::" in line) == [
        "test_archs.py::test_gqa[FalconForCausalLM]", "test_archs.py::test_gqa[Gemma2ForCausalLM]",
        "test_archs.py::test_mine[Qwen2ForCausalLM]", "test_archs.py::test_named[BloomForCausalLM]"]
    everything = pytester.runpytest(*PLUGIN, "--collect-only", "-q")
    assert sum("test_gqa[" in line for line in everything.outlines) == 12
    unknown = pytester.runpytest(*PLUGIN, "--collect-only", "-q", "--tlc-architectures=Gpt2")
    unknown.stdout.fnmatch_lines(["*unknown tiny architecture 'Gpt2'*"])


def test_what_cannot_be_built_is_skipped_with_the_reason(pytester):
    pytester.makepyfile(test_kinds="""
        import pytest

        @pytest.fixture
        def tlc_model_kind():
            return "hooked"

        @pytest.mark.tlc_architectures("GPT2LMHeadModel", "Gemma2ForCausalLM")
        def test_runs(tlc_tiny_model, tlc_architecture):
            assert type(tlc_tiny_model).__name__ == "HookedTransformer"
    """)
    result = pytester.runpytest(*PLUGIN, "-rs")
    if has_hooked_transformer():
        result.assert_outcomes(passed=1, skipped=1)
        result.stdout.fnmatch_lines(["SKIPPED *no HookedTransformer of Gemma2ForCausalLM here*"])
    else:
        result.assert_outcomes(skipped=2)
        result.stdout.fnmatch_lines(["SKIPPED [[]2[]] *has no HookedTransformer (4.x removed it)*"])


def test_task_batches_are_seeded_and_take_the_bundled_models_settings(pytester):
    pytester.makepyfile(test_batches="""
        import pytest
        import torch

        def test_default_model(tlc_task_batch, tlc_seed):
            a, b = tlc_task_batch("induction", 8), tlc_task_batch("induction", 8)
            assert torch.equal(a.tokens, b.tokens) and a.params["seed"] == tlc_seed == 5
            assert a.tokens.shape == (8, 33) and int(a.tokens.max()) < 64 and a.params["period"] == 16
            assert not torch.equal(a.tokens, tlc_task_batch("induction", 8, seed=6).tokens)
            assert tlc_task_batch("induction", 4, d_vocab=50, seq_len=12).tokens.shape == (4, 12)

        @pytest.mark.tlc_bundled("planted-conflict-2l")
        def test_marked_model(tlc_task_batch, tlc_bundled_info, tlc_bundled_model):
            assert tlc_bundled_info.name == "planted-conflict-2l" and tlc_bundled_model.cfg.n_heads == 2
            assert tlc_task_batch("skip_induction", 4).params["period"] == (22, 28)
            with pytest.raises(ValueError, match="was evaluated on"):
                tlc_task_batch("counting", 4)
    """)
    result = pytester.runpytest(*PLUGIN, "--tlc-seed=5")
    result.assert_outcomes(passed=2)


def test_loading_the_plugin_imports_nothing_heavy(in_path):
    code = ("import sys, pytest_tl_circuits; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformer_lens', 'tl_circuits', "
            "'transformers', 'numpy')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_a_project_that_does_not_use_it_runs_as_without_it(pytester, in_path):
    pytester.makepyfile(test_plain="""
        import sys

        def test_one():
            assert "torch" not in sys.modules and "tl_circuits" not in sys.modules

        def test_two(tmp_path):
            assert tmp_path.exists()
    """)
    runs = {flag: pytester.runpytest_subprocess("-p", flag, "-q") for flag in ("pytest_tl_circuits",
                                                                               "no:pytest_tl_circuits")}
    for run in runs.values():
        run.assert_outcomes(passed=2)
    collected = [[line for line in pytester.runpytest_subprocess("-p", flag, "--collect-only", "-q").outlines
                  if "::" in line] for flag in runs]
    assert collected[0] == collected[1] == ["test_plain.py::test_one", "test_plain.py::test_two"]


def test_the_entry_point_is_declared_and_an_install_registers_it(pytester, in_path):
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["pytest11"]
    assert declared == {"pytest_tl_circuits": "pytest_tl_circuits"}
    installed = [ep for ep in metadata.entry_points(group="pytest11") if ep.value == "pytest_tl_circuits"]
    if not installed:
        pytest.skip("tl_circuits is installed without its pytest11 entry point here (an install made before it "
                    "existed): reinstall to check that installing is enough")
    pytester.makepyfile(test_auto="def test_seed(tlc_seed):\n    assert tlc_seed == 0\n")
    pytester.runpytest_subprocess().assert_outcomes(passed=1)
    pytester.runpytest_subprocess("-p", "no:tl_circuits").assert_outcomes(errors=1)
