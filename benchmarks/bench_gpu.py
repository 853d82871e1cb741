"""Benchmark on one GPU: GPT-2-small-shaped interference end to end (100 x 100), the freeze sweep, and the tests.

One process, ``--device cuda`` (the default when CUDA is available): every stage is timed after the model is built
and moved to the device and after a small warm-up (CUDA context, kernels), with ``torch.cuda.synchronize()`` before
each clock read. Stages:

1. ``compute_interference``, N_A = N_B = 100 random 64-token samples, all 4 blocks x 12 x 12 heads;
2. ``freeze_sweep``, QK and OV of every head on a batch of 8;
3. the pooled matrix of the tests (``pooled_scores``, A ∪ B, 200 x 200);
4. ``permutation_test`` of that matrix on the device (default permutations for 576 cells, 2000 bootstrap resamples);
5. ``conflict_test`` of the A x B map.

A stage that fails prints its error in the table and the others still run, so one short GPU session gives every
number. Peak GPU memory is printed per stage. Designed to finish in under 10 minutes on one GPU.

    python benchmarks/bench_gpu.py              # on a GPU
    python benchmarks/bench_gpu.py --smoke      # tiny model on the CPU, seconds (CI)
"""

from __future__ import annotations

import argparse
import time
import warnings
from typing import Callable

import torch

FULL = dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257, n_pos=64, n=100, batch=8)
SMOKE = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=50, n_pos=16, n=6, batch=3)


def build(shape: dict, device: str):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=shape["n_layers"], d_model=shape["d_model"], n_heads=shape["n_heads"],
                                  d_head=shape["d_head"], d_mlp=shape["d_mlp"], n_ctx=shape["n_pos"],
                                  d_vocab=shape["d_vocab"], act_fn="gelu_new", normalization_type="LN", seed=0,
                                  device=device)
    return HookedTransformer(cfg).eval()


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def peak_gb(device: str) -> float:
    if torch.device(device).type != "cuda":
        return float("nan")
    return torch.cuda.max_memory_allocated() / 2**30


def stage(name: str, device: str, call: Callable[[], object], rows: list) -> object:
    """Run and time one stage; a failure is recorded, not raised."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    start = time.perf_counter()
    try:
        result = call()
        synchronize(device)
        rows.append((name, f"{time.perf_counter() - start:9.2f} s", f"{peak_gb(device):6.2f} GB", ""))
        return result
    except Exception as error:  # keep going: one GPU session should give every number it can
        rows.append((name, "   failed", "", f"{type(error).__name__}: {str(error).splitlines()[0][:100]}"))
        return None


def main() -> None:
    from tl_circuits import GradientConfig, InterferenceConfig, compute_interference, conflict_test, freeze_sweep
    from tl_circuits.interference.engine import pooled_scores
    from tl_circuits.stats.permutation import permutation_test

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny model on the CPU (CI)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    shape = SMOKE if args.smoke else FULL
    device = args.device or ("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    name = torch.cuda.get_device_name() if torch.device(device).type == "cuda" else "CPU"
    print(f"tl_circuits GPU benchmark on {device} ({name}); torch {torch.__version__}; {shape['n_layers']} layers x "
          f"{shape['n_heads']} heads, d_model {shape['d_model']}, vocab {shape['d_vocab']}, {shape['n_pos']} "
          f"positions, N_A = N_B = {shape['n']}")
    model = build(shape, device)
    gen = torch.Generator().manual_seed(0)
    half = shape["d_vocab"] // 2
    a = torch.randint(0, half, (shape["n"], shape["n_pos"]), generator=gen).to(device)
    b = torch.randint(half, shape["d_vocab"], (shape["n"], shape["n_pos"]), generator=gen).to(device)
    cfg = InterferenceConfig(gradients=GradientConfig(memory_budget_gb=16.0, progress=False))
    compute_interference(model, a[:2], b[:2], config=cfg)  # warm-up: CUDA context and kernels
    freeze_sweep(model, a[:1], progress=False)
    rows: list = []
    result = stage("compute_interference", device, lambda: compute_interference(model, a, b, config=cfg), rows)
    stage("freeze_sweep (QK + OV)", device, lambda: freeze_sweep(model, a[:shape["batch"]], progress=False), rows)
    pooled = stage("pooled_scores (A ∪ B)", device, lambda: pooled_scores(model, a, b, config=cfg), rows)
    if pooled is not None:
        matrix = {block: s.to(device) for block, s in pooled.scores.items()}  # type: ignore[attr-defined]
        stage("permutation_test", device, lambda: permutation_test(matrix, shape["n"], alternative="less",
                                                                   progress=False), rows)
    if result is not None:
        stage("conflict_test", device, lambda: conflict_test(result), rows)
    if result is not None:
        timings = result.settings["timings"]  # type: ignore[attr-defined]
        rows.append(("  of which gradients", f"{timings['gradients_s']:9.2f} s", "", ""))
        rows.append(("  of which scoring", f"{timings['scoring_s']:9.2f} s", "", ""))
    print(f"  {'stage':28s} {'wall':>11s} {'peak GPU':>9s}")
    for stage_name, wall, peak, note in rows:
        print(f"  {stage_name:28s} {wall:>11s} {peak:>9s}  {note}")
    if any(wall.strip() == "failed" for _, wall, _, _ in rows):
        raise SystemExit("some stages failed (see the table)")


if __name__ == "__main__":
    main()
