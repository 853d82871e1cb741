"""Every heavy call under ``torchrun --standalone --nproc_per_node=2`` (gloo, CPU) against the same call in
one process: gradients, the interference map (three variants, whole and tiled), the pooled matrix, the permutation
test of a fixed matrix and end to end, the conflict test. One launch runs them all (tests/distributed/worker.py);
every rank's result is compared, with uneven sample counts (5 + 3, 4 + 3) over 2 ranks.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import scenarios
from tests.distributed.launch import REPO, busy_port, torchrun
from tests.distributed.scenarios import RANKS_ONLY, SCENARIOS

RTOL = 1e-5
# work done per rank, not results
COUNTS = ("forwarded_samples", "null_rows", "sweep_forwards", "built_rows", "factor_bytes")
EXACT = ("p_value", "q_value_bh", "p_value_maxstat", "p_value_cluster", "permutations", "n_targets")


@pytest.fixture(scope="module")
def distributed(tmp_path_factory):
    """{scenario: [rank 0's result, rank 1's result]} from one torchrun launch."""
    out = tmp_path_factory.mktemp("distributed")
    with busy_port(29500):  # torchrun's default port taken: --standalone must find another
        run = torchrun([str(REPO / "tests" / "distributed" / "worker.py"), str(out)])
    assert run.returncode == 0, f"torchrun failed:\n{run.stdout[-3000:]}\n{run.stderr[-6000:]}"
    scenarios.CHECKPOINT_DIR[:] = [str(out / "checkpoints")]  # the single-process run resumes from the ranks' shards
    return {name: [torch.load(out / f"{name}.rank{r}.pt") for r in range(2)] for name in SCENARIOS}


def assert_same(got: dict, want: dict, where: str) -> None:
    assert got.keys() == want.keys(), where
    for key, expected in want.items():
        actual = got[key]
        if key.split(".")[0] in EXACT:  # same seed, same relabelings, same p-values
            torch.testing.assert_close(actual, expected, rtol=0, atol=0, equal_nan=True, msg=f"{where}: {key}")
            continue
        scale = float(expected.double().nan_to_num().abs().max()) if expected.numel() else 0.0
        torch.testing.assert_close(actual.double(), expected.double(), rtol=RTOL, atol=RTOL * scale,
                                   equal_nan=True, msg=lambda m, k=key: f"{where}: {k}: {m}")


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_every_rank_gets_the_single_process_result(distributed, name):
    results = [{k: v for k, v in r.items() if k not in COUNTS} for r in distributed[name]]
    single = SCENARIOS[name]() if name not in RANKS_ONLY else results[0]
    if name == "sweep_noise_fresh_seed":  # the seed rank 0 drew, rerun in one process
        single = scenarios._sweep("noise", seed=int(results[0]["draw_seed"])) | {"draw_seed": results[0]["draw_seed"]}
    for rank, result in enumerate(results):
        assert_same(result, single, f"{name}, rank {rank}")


def test_samples_are_split_not_repeated(distributed):
    """Each sample's gradient is computed on one rank only: the ranks' counts add up to the samples (5 + 3)."""
    counts = [int(r["forwarded_samples"]) for r in distributed["interference_signed_a"]]
    assert sum(counts) == 8 and max(counts) < 8, counts
    counts = [int(r["forwarded_samples"]) for r in distributed["gradients"]]
    assert sorted(counts) == [2, 3], counts  # 3 chunks of 2, 2, 1 over 2 ranks


@pytest.mark.parametrize("name", ["interference_signed_a", "pooled"])
def test_score_rows_are_built_once_across_ranks(distributed, monkeypatch, name):
    """Where the right side is one tile, each sample's rows of each layer are built on one rank only: the ranks'
    counts of (sample, layer) rows add up to one process's (its left and right rows per block and layer), and
    each rank builds fewer."""
    from tl_circuits.interference import scoring

    real, single = scoring.RowBuilder.__call__, [0]

    def counted(self, samples, block, layers, rows, *args, **kwargs):
        single[0] += (rows.stop - rows.start) * (layers.stop - layers.start)
        return real(self, samples, block, layers, rows, *args, **kwargs)

    monkeypatch.setattr(scoring.RowBuilder, "__call__", counted)
    SCENARIOS[name]()
    counts = [int(r["built_rows"]) for r in distributed[name]]
    assert sum(counts) == single[0] and max(counts) < single[0], (counts, single[0])


@pytest.mark.parametrize("name", ["interference_signed_a", "interference_three_layers_spilled", "pooled"])
def test_factors_are_held_once_across_ranks(distributed, monkeypatch, name):
    """Each rank holds (or spills) the factors of its own layers only: the ranks' factor bytes add up to one
    process's, and each rank holds fewer (2 layers: 1 + 1; 3 layers: 2 + 1)."""
    from tl_circuits.interference import store

    real, single = store.FactorStore.__init__, [0]

    def counted(self, *args, **kwargs):
        real(self, *args, **kwargs)
        single[0] += self.nbytes

    monkeypatch.setattr(store.FactorStore, "__init__", counted)
    SCENARIOS[name]()
    counts = [int(r["factor_bytes"]) for r in distributed[name]]
    assert sum(counts) == single[0] and max(counts) < single[0], (counts, single[0])


def test_sweep_variants_are_split_not_repeated(distributed):
    """2 layers × 3 stacked passes: 3 passes per rank, NOISE too (each item draws its own noise stream)."""
    assert [int(r["sweep_forwards"]) for r in distributed["sweep_zero"]] == [3, 3]
    assert [int(r["sweep_forwards"]) for r in distributed["sweep_noise"]] == [3, 3]


def test_one_process_resumes_from_the_shards_of_the_ranks(distributed, monkeypatch):
    """The ranks wrote their shards (named by global sample range); one process finds every one of them."""
    from tl_circuits.interference import chunk_engines

    def no_gradients(*args):
        raise AssertionError("a gradient was computed although every shard was on disk")

    monkeypatch.setattr(chunk_engines, "_factor_chunk", no_gradients)
    assert_same(scenarios.checkpointed(), {k: v for k, v in distributed["checkpointed"][0].items()
                                           if k not in COUNTS}, "resumed")


def test_relabelings_are_split_not_repeated(distributed):
    """Each of the 199 relabelings of each of the 2 blocks is reduced on one rank (+ the observed labels once per
    block and rank)."""
    counts = [int(r["null_rows"]) for r in distributed["permutation_synthetic"]]
    assert sorted(counts) == [2 * 99 + 2, 2 * 100 + 2], counts


def test_results_are_not_trivial(distributed):
    """The compared numbers carry information: scores vary, p-values are not all 1, NaN is not everywhere."""
    scores = distributed["interference_signed_a"][0]["scores.Q"]
    assert torch.isfinite(scores).all() and scores.std() > 0
    p = distributed["permutation_synthetic"][0]["p_value.Q"]
    assert float(p.min()) < 0.05 < float(p.max())
    for circuit in ("qk", "ov"):  # every cell of the merged sweep grid was run by some rank
        frozen = distributed["sweep_zero"][1][f"frozen.{circuit}"]
        assert torch.isfinite(frozen).all() and frozen.std() > 0
