"""Benchmark: layer subsets (issue #25 §1) against the full run, the named baseline, side by side.

Model: a GPT-2-small-shaped TransformerBridge around a randomly initialised ``GPT2LMHeadModel`` (12 layers, 12 heads,
d_model 768, 64 positions, vocabulary 1000; it runs on TransformerLens 3 and 4), random tokens, a few samples.

1. ``freeze_sweep`` of the last 2 of 12 layers (``layers=[10, 11]``) vs the full sweep (goal: <= 0.3x the time);
2. ``compute_interference`` on the last 2 layers vs every layer (goal: <= 0.5x the time and the peak memory).

Every measurement runs in its own subprocess, so its peak memory is its own: peak RSS above the process's baseline
after building the model and a warm-up (CPU), or ``torch.cuda.max_memory_allocated`` (GPU). No assertions on time;
run it on a quiet machine.

    python benchmarks/bench_subsets.py                 # GPT-2-small shape
    python benchmarks/bench_subsets.py --smoke         # tiny model, a few seconds
    python benchmarks/bench_subsets.py --device cuda   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore")

GB = 2**30
FULL = dict(n_layer=12, n_embd=768, n_head=12, vocab_size=1000, n_positions=64, n_samples=4)
SMOKE = dict(n_layer=4, n_embd=32, n_head=4, vocab_size=50, n_positions=16, n_samples=3)


def build(shape: dict, device: str):
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=shape["n_layer"], n_embd=shape["n_embd"], n_head=shape["n_head"],
                        vocab_size=shape["vocab_size"], n_positions=shape["n_positions"])
    hf = GPT2LMHeadModel(config).to(device).eval()
    return build_bridge_from_module(hf, architecture="GPT2LMHeadModel", hf_config=hf.config).eval()


def tokens(shape: dict, seed: int, device: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, shape["vocab_size"], (shape["n_samples"], shape["n_positions"]), generator=gen).to(device)


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # Linux: kB


def measure(kind: str, subset: bool, smoke: bool, device: str, samples: int = 0) -> dict:
    """One measurement, in this process: seconds and peak memory of one call (``samples``: per task, 0: the
    shape's)."""
    from tl_circuits.freezing.sweep import freeze_sweep
    from tl_circuits.interference.engine import compute_interference

    shape = dict(SMOKE if smoke else FULL)
    if samples:
        shape["n_samples"] = samples
    model = build(shape, device)
    a, b = tokens(shape, 0, device), tokens(shape, 1, device)
    last_two = [shape["n_layer"] - 2, shape["n_layer"] - 1]
    layers = last_two if subset else None

    def call(short: bool = False):
        x, y = (a[:2, :8], b[:2, :8]) if short else (a, b)
        if kind == "sweep":
            return freeze_sweep(model, x, layers=layers, progress=False)
        return compute_interference(model, x, y, layers=layers, progress=False)

    call(short=True)  # warm-up (allocator, kernels), not timed
    baseline = rss_gb()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    call()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / GB if device.startswith("cuda") else rss_gb() - baseline
    return {"seconds": seconds, "peak_gb": peak, "absolute_gb": rss_gb()}


def in_subprocess(kind: str, subset: bool, smoke: bool, device: str, samples: int = 0) -> dict:
    args = [sys.executable, __file__, "--one", kind, "--device", device, "--samples", str(samples)] + (
        ["--subset"] if subset else []) + (["--smoke"] if smoke else [])
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model: checks that the benchmark runs")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--one", choices=("sweep", "interference"), help=argparse.SUPPRESS)
    parser.add_argument("--subset", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--samples", type=int, default=0,
                        help="samples per task (default: 4; more make the interference's factor memory dominate)")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.subset, args.smoke, args.device, args.samples)))
        return
    shape = dict(SMOKE if args.smoke else FULL)
    shape["n_samples"] = args.samples or shape["n_samples"]
    n = shape["n_layer"]
    print(f"GPT-2-shaped bridge: {n} layers x {shape['n_head']} heads, d_model {shape['n_embd']}, "
          f"{shape['n_positions']} positions, {shape['n_samples']} samples per task, device {args.device}")
    print(f"{'call':<28}{'full (baseline)':>18}{'last 2 layers':>16}{'ratio':>8}{'goal':>8}")
    for kind, goal in (("sweep", 0.3), ("interference", 0.5)):
        full = in_subprocess(kind, False, args.smoke, args.device, args.samples)
        sub = in_subprocess(kind, True, args.smoke, args.device, args.samples)
        print(f"{kind + ' time (s)':<28}{full['seconds']:>18.3f}{sub['seconds']:>16.3f}"
              f"{sub['seconds'] / full['seconds']:>8.2f}{goal:>8}")
        if kind == "interference":
            ratio = sub["peak_gb"] / full["peak_gb"] if full["peak_gb"] > 0 else float("nan")
            print(f"{kind + ' peak memory (GB)':<28}{full['peak_gb']:>18.3f}{sub['peak_gb']:>16.3f}"
                  f"{ratio:>8.2f}{goal:>8}")
            print(f"{'  (peak RSS, absolute)':<28}{full['absolute_gb']:>18.3f}{sub['absolute_gb']:>16.3f}")


if __name__ == "__main__":
    main()
