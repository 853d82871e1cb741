"""The freezing entry points take their shared defaults from tl_circuits.defaults and share no mutable default."""

import inspect

import pytest

from tl_circuits import compute_mean_activations, defaults, freeze, freeze_sweep
from tl_circuits.freezing import freeze_hooks
from tl_circuits.freezing import NOISE_SCALE, FreezeSpec

ENTRY_POINTS = [freeze, freeze_hooks, freeze_sweep]


@pytest.mark.parametrize("function", ENTRY_POINTS + [compute_mean_activations], ids=lambda f: f.__name__)
def test_no_mutable_default_arguments(function):
    for name, parameter in inspect.signature(function).parameters.items():
        assert not isinstance(parameter.default, (list, dict, set, bytearray)), (function.__name__, name)


@pytest.mark.parametrize("function", ENTRY_POINTS, ids=lambda f: f.__name__)
def test_seed_and_noise_scale_defaults_are_shared(function):
    parameters = inspect.signature(function).parameters
    assert parameters["seed"].default == defaults.SEED
    assert parameters["noise_scale"].default == NOISE_SCALE
    fields = FreezeSpec.__dataclass_fields__
    assert fields["seed"].default == defaults.SEED and fields["noise_scale"].default == NOISE_SCALE
