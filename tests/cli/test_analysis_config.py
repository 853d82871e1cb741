"""AnalysisConfig composes an InterferenceConfig, and the command's defaults are the library's (no model needed)."""

from __future__ import annotations

import dataclasses

import pytest

from tl_circuits import defaults
from tl_circuits.cli.analysis import AnalysisConfig
from tl_circuits.cli.command import parse_options
from tl_circuits.interference.config import GradientConfig, InterferenceConfig


def test_command_defaults_are_the_library_defaults():
    config = parse_options([]).analysis_config()
    assert config == AnalysisConfig()
    assert config.interference == InterferenceConfig(fisher_source="pooled")
    assert (config.variant, config.n_bootstrap, config.alpha, config.seed) == (
        defaults.VARIANT, defaults.N_BOOTSTRAP, defaults.ALPHA, defaults.SEED)
    assert config.interference.memory_budget_gb == defaults.MEMORY_BUDGET_GB
    assert config.n_permutations is None and config.permutations_for(32) == defaults.default_n_permutations(32)


def test_options_map_onto_the_interference_config():
    options = parse_options(["--variant", "unsigned", "--memory-budget-gb", "1.5", "--n-bootstrap", "7", "--quiet",
                             "--n-permutations", "99", "--alpha", "0.1", "--replacement", "mean", "--seed", "4"])
    config = options.analysis_config()
    assert config.interference == InterferenceConfig(
        gradients=GradientConfig(memory_budget_gb=1.5, progress=False), variant="unsigned", fisher_source="pooled")
    assert (config.n_bootstrap, config.n_permutations, config.alpha, config.replacement, config.seed) == (
        7, 99, 0.1, "mean", 4)
    assert config.alternative == "greater" and not config.progress
    # the option's earlier name still works
    assert parse_options(["--memory-gb", "0.5"]).analysis_config().interference.memory_budget_gb == 0.5


def test_analysis_config_is_frozen_and_checks_its_settings():
    config = AnalysisConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.seed = 1  # type: ignore[misc]
    assert AnalysisConfig(interference=InterferenceConfig()).interference.fisher_source == "pooled"
    with pytest.raises(ValueError, match="pooled Fisher"):
        AnalysisConfig(interference=InterferenceConfig(fisher_source="a"))
    with pytest.raises(TypeError, match="InterferenceConfig"):
        AnalysisConfig(interference=GradientConfig())  # type: ignore[arg-type]
    for bad, message in ((dict(replacement="noise"), "replacement"), (dict(n_permutations=0), "n_permutations"),
                         (dict(n_bootstrap=-1), "n_bootstrap"), (dict(alpha=1.5), "alpha"),
                         (dict(correction="holm"), "correction"), (dict(top_k=0), "top_k")):
        with pytest.raises(ValueError, match=message):
            AnalysisConfig(**bad)


def test_settings_record_the_permutations_used():
    settings = AnalysisConfig().to_dict(n_permutations_used=1280)
    assert settings["n_permutations"] == 1280 and settings["n_permutations_requested"] is None
    assert settings["interference"]["fisher_source"] == "pooled"
    assert settings["interference"]["gradients"]["memory_budget_gb"] == defaults.MEMORY_BUDGET_GB


def test_normalization_option_maps_onto_the_interference_config(capsys):
    assert parse_options([]).analysis_config().interference.normalization == defaults.NORMALIZATION
    config = parse_options(["--normalization", "head"]).analysis_config()
    assert config.interference == InterferenceConfig(fisher_source="pooled", normalization="head")
    assert config.to_dict()["interference"]["normalization"] == "head"
    with pytest.raises(SystemExit) as exit_info:
        parse_options(["--normalization", "structural"])
    assert exit_info.value.code == 2 and "--normalization: invalid choice: 'structural'" in capsys.readouterr().err
