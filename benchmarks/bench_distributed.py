"""Benchmark: 2 ranks x 1 thread against 1 process x 1 thread, the same work, for the interference map and the sweep.

Both sides are launched by ``torchrun --standalone`` (``--nproc_per_node=2`` and ``=1``, gloo, CPU), so start-up is
alike and not timed: each rank builds the model and tasks, waits at a barrier, and then the call is timed (up to
the barrier after it). A one-process torchrun has no split (world size 1: nothing changes). Printed: the seconds
of each side, the speed-up (goal >= 1.6x) and the largest difference between the two sides' results relative to
the largest score (goal <= 1e-5). Timings on a shared machine mean nothing: run the full size on a quiet one.

Model: GPT-2-small shape (12 layers, 12 heads, d_model 768, d_mlp 3072, 64 positions, vocab 1000, random weights),
N_A = N_B = 64 random token samples (``--samples``); the sweep: QK and OV of every head on a batch of 8. The memory
budget (``--budget-gb``, per process) decides whether the factors are spilled to disk; it is printed for each side.

    python benchmarks/bench_distributed.py            # full size (~10 min on 2 free cores)
    python benchmarks/bench_distributed.py --budget-gb 16 --sweep-batch 1   # neither side spills
    python benchmarks/bench_distributed.py --smoke    # tiny model, seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

FULL = dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=1000, n_pos=64)
SMOKE = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=50, n_pos=16)
REPO = Path(__file__).resolve().parents[1]


def build(shape: dict):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=shape["n_layers"], d_model=shape["d_model"], n_heads=shape["n_heads"],
                                  d_head=shape["d_head"], d_mlp=shape["d_mlp"], n_ctx=shape["n_pos"],
                                  d_vocab=shape["d_vocab"], act_fn="gelu", normalization_type="LN", seed=0,
                                  device="cpu")
    return HookedTransformer(cfg).eval()


def timed(call, barrier) -> tuple[float, object]:
    barrier()
    start = time.perf_counter()
    result = call()
    barrier()
    return time.perf_counter() - start, result


def child(shape: dict, n: int, batch: int, out: Path, budget_gb: float) -> None:
    """One rank: the interference map and the sweep, each timed between barriers; rank 0 writes the results."""
    import torch.distributed as dist

    from tl_circuits import GradientConfig, InterferenceConfig, compute_interference, freeze_sweep
    from tl_circuits.distributed import current_world

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo")
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(0, shape["d_vocab"] // 2, (n, shape["n_pos"]), generator=gen)
    b = torch.randint(shape["d_vocab"] // 2, shape["d_vocab"], (n, shape["n_pos"]), generator=gen)
    model = build(shape)
    world = current_world()  # distribution is opt-in: every heavy call is given the group's world
    cfg = InterferenceConfig(gradients=GradientConfig(memory_budget_gb=budget_gb, progress=False))
    interference_s, result = timed(lambda: compute_interference(model, a, b, config=cfg, world=world), dist.barrier)
    sweep_s, sweep = timed(lambda: freeze_sweep(model, a[:batch], progress=False, world=world), dist.barrier)
    if dist.get_rank() == 0:
        torch.save({"scores": result.scores, "frozen": sweep.frozen}, out / "results.pt")  # type: ignore[union-attr]
        (out / "timings.json").write_text(json.dumps({"interference_s": interference_s, "sweep_s": sweep_s,
                                                      "world_size": dist.get_world_size(),
                                                      "spill": result.settings["plan"]["spill"],
                                                      "stages": result.settings["timings"]}))
    dist.destroy_process_group()


def launch(n_ranks: int, args: argparse.Namespace, out: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_ranks}",
               __file__, "--child", str(out), "--samples", str(args.n), "--sweep-batch", str(args.batch),
               "--budget-gb", str(args.budget_gb)]
    if args.smoke:
        command.append("--smoke")
    run = subprocess.run(command, env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"torchrun with {n_ranks} rank(s) failed:\n{run.stderr[-4000:]}")
    return {**json.loads((out / "timings.json").read_text()), **torch.load(out / "results.pt")}


def max_relative_difference(got: dict, want: dict) -> float:
    worst = 0.0
    for key, tensor in want.items():
        scale = float(tensor.abs().nan_to_num().max()) or 1.0
        worst = max(worst, float((got[key] - tensor).abs().nan_to_num().max()) / scale)
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model and tasks (CI)")
    parser.add_argument("--samples", dest="n", type=int, default=None, help="samples per task (default 64; smoke 5)")
    parser.add_argument("--sweep-batch", dest="batch", type=int, default=None, help="sweep batch (default 8; smoke 3)")
    parser.add_argument("--budget-gb", dest="budget_gb", type=float, default=6.0,
                        help="memory budget per process (default 6 GB: at N = 64 one process spills its factors "
                             "to disk and a rank of two, holding half the layers, does not; 16 GB: neither)")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.n = args.n or (5 if args.smoke else 64)
    args.batch = args.batch or (3 if args.smoke else 8)
    shape = SMOKE if args.smoke else FULL
    if args.child is not None:
        child(shape, args.n, args.batch, args.child, args.budget_gb)
        return
    print(f"tl_circuits distributed benchmark: {shape['n_layers']} layers x {shape['n_heads']} heads, d_model "
          f"{shape['d_model']}, {shape['n_pos']} positions, N_A = N_B = {args.n}, sweep batch {args.batch}; "
          f"torch {torch.__version__}, 1 thread per process, gloo, budget {args.budget_gb} GB per process")
    with tempfile.TemporaryDirectory() as one_dir, tempfile.TemporaryDirectory() as two_dir:
        one, two = launch(1, args, Path(one_dir)), launch(2, args, Path(two_dir))
    assert one["world_size"] == 1 and two["world_size"] == 2
    print(f"  factors spilled to disk: 1 process {one['spill']}, 2 ranks {two['spill']}")
    print("  interference stages (rank 0): " + "; ".join(
        f"{stage} {one['stages'][stage]:.2f} s vs {two['stages'][stage]:.2f} s" for stage in one["stages"]))
    for name, key, what in (("interference", "interference_s", "scores"), ("freeze sweep", "sweep_s", "frozen")):
        ratio = one[key] / two[key]
        diff = max_relative_difference(two[what], one[what])
        print(f"  {name:14s} 1 process {one[key]:8.2f} s   2 ranks {two[key]:8.2f} s   speed-up {ratio:5.2f}x "
              f"(goal >= 1.6x)   max |difference| / max |value| {diff:.1e} (goal <= 1e-5)")
        if diff > 1e-5:
            raise SystemExit(f"{name}: the 2-rank result differs from the 1-process one by {diff:.1e}")


if __name__ == "__main__":
    main()
