"""Distribution is opt-in: inside an initialised process group, a heavy call without ``world=`` runs in its process
alone. Rank 0 of a 2-rank gloo group calls freeze_sweep, compute_interference, the pooled matrix, per-sample
gradients and the permutation and conflict tests while rank 1 joins no collective: no hang (the group's timeout
would turn one into an error), and every result is the single-process one (computed here, without a group).
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import scenarios
from tests.distributed.launch import REPO, torchrun
from tests.distributed.test_distributed import assert_same
from tl_circuits import freeze_sweep
from tl_circuits.distributed import World, current_world
from tl_circuits.parallel.group import resolve_world

WORKER = str(REPO / "tests" / "distributed" / "rank_zero_worker.py")
NAMES = ("gradients", "interference_signed_a", "pooled", "permutation_synthetic", "permutation_screened",
         "interference_permutation", "conflict", "sweep_zero", "sweep_noise", "sweep_per_sample")


def test_rank_zero_alone_gets_the_single_process_results(tmp_path):
    run = torchrun([WORKER, str(tmp_path), *NAMES])
    assert run.returncode == 0, f"torchrun failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    for name in NAMES:
        got = torch.load(tmp_path / f"{name}.pt")
        assert_same(got, scenarios.SCENARIOS[name](), f"{name}, rank 0 alone")


def test_a_world_that_is_not_the_process_group_is_a_clear_error():
    """world=World(0, 2) without a process group (e.g. a world built by hand) is refused before any work."""
    assert not current_world().active
    with pytest.raises(ValueError, match=r"world=rank 0 of 2 is not this process's process group \(no process "
                                         r"group initialised\)"):
        freeze_sweep(object(), torch.zeros(1, 2, dtype=torch.long), world=World(0, 2))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="world must be a tl_circuits World"):
        resolve_world(2)  # type: ignore[arg-type]
    assert resolve_world(None) == World() and resolve_world(World()) == World()
