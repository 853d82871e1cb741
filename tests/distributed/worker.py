"""The torchrun worker of the distributed tests: ``worker.py OUT [NAME ...]`` runs every scenario (or the named
ones) under the gloo process group torchrun describes and writes ``OUT/<name>.rank<r>.pt`` from every rank.

Not collected by pytest (no ``test_`` prefix); started by ``tests/distributed/test_distributed.py``.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tests.distributed import scenarios
from tests.distributed.scenarios import SCENARIOS


def count_forwarded_samples() -> list[int]:
    """Count the samples this rank runs through the factored engine's forward/backward (a one-item list)."""
    from tl_circuits.interference import chunk_engines

    real, count = chunk_engines._factor_chunk, [0]

    def counted(model, spec, tokens, *rest):
        count[0] += tokens.shape[0]
        return real(model, spec, tokens, *rest)

    chunk_engines._factor_chunk = counted
    return count


def count_null_rows() -> list[int]:
    """Count the relabelings this rank reduces in permutation_test (a one-item list): every relabeling, the observed
    labels included, is reduced by stats/null.py's relabeled_statistic."""
    from tl_circuits.stats import null

    real, count = null.bilinear, [0]

    def counted(left, *args, **kwargs):
        count[0] += left.shape[0]
        return real(left, *args, **kwargs)

    null.bilinear = counted
    return count


def count_sweep_forwards() -> list[int]:
    """Count this rank's stacked forwards of the freeze sweep (a one-item list)."""
    from tl_circuits.freezing import stacked as sweep  # the stacked passes live in freezing/stacked.py

    real, count = sweep._stacked_hooks, [0]

    def counted(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    sweep._stacked_hooks = counted
    return count


def count_held_factor_bytes() -> list[int]:
    """Count the bytes of gradient factors this rank's factor stores hold (or spill) (a one-item list)."""
    from tl_circuits.interference import store

    real, count = store.FactorStore.__init__, [0]

    def counted(self, *args, **kwargs):
        real(self, *args, **kwargs)
        count[0] += self.nbytes

    store.FactorStore.__init__ = counted
    return count


def count_built_rows() -> list[int]:
    """Count the (sample, layer) rows this rank builds from factors, over every (block, layer group)."""
    from tl_circuits.interference import scoring

    real, count = scoring.RowBuilder.__call__, [0]

    def counted(self, samples, block, layers, rows, *args, **kwargs):
        count[0] += (rows.stop - rows.start) * (layers.stop - layers.start)
        return real(self, samples, block, layers, rows, *args, **kwargs)

    scoring.RowBuilder.__call__ = counted
    return count


def main(out: Path, names: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    forwarded, null_rows, sweep_forwards = count_forwarded_samples(), count_null_rows(), count_sweep_forwards()
    built_rows, factor_bytes = count_built_rows(), count_held_factor_bytes()
    scenarios.CHECKPOINT_DIR[:] = [str(out / "checkpoints")]
    for name in names or list(SCENARIOS):
        forwarded[0] = null_rows[0] = sweep_forwards[0] = built_rows[0] = factor_bytes[0] = 0
        result = SCENARIOS[name]()
        result["forwarded_samples"] = torch.tensor(forwarded[0])
        result["null_rows"] = torch.tensor(null_rows[0])
        result["sweep_forwards"] = torch.tensor(sweep_forwards[0])
        result["built_rows"] = torch.tensor(built_rows[0])
        result["factor_bytes"] = torch.tensor(factor_bytes[0])
        torch.save(result, out / f"{name}.rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
