"""Benchmark: layer subsets (issue #25 §1) against the full run, the named baseline, side by side.

Model: a GPT-2-small-shaped TransformerBridge around a randomly initialised ``GPT2LMHeadModel`` (12 layers, 12 heads,
d_model 768, 64 positions, vocabulary 1000; it runs on TransformerLens 3 and 4), random tokens, a few samples.

1. ``freeze_sweep`` of the last 2 of 12 layers (``layers=[10, 11]``) vs the full sweep (goal: <= 0.3x the time);
2. ``compute_interference`` on the last 2 layers vs every layer (goal: <= 0.5x the time and the peak memory).

Every measurement runs in its own subprocess, so its peak memory is its own. Memory is reported in parts, since
only some of it can follow a selection:

- *model + runtime*: the process's RSS after building the model and a warm-up call (weights, torch, the bridge);
  the same in both runs (and the model's construction peaks above it, so a process's absolute peak RSS says
  little);
- *peak above the model*: the call's peak RSS above that (Linux: ``VmHWM`` reset through ``/proc/self/clear_refs``
  when the call starts), and the same peak within the gradient pass and within the score pass (GPU:
  ``torch.cuda.max_memory_allocated``, reset likewise);
- the memory plan's figures (``settings["plan"]``): samples per forward/backward, layers per score contraction,
  the factors' size and whether they were spilled, the planned peak.

No assertions on time; run it on a quiet machine (peak memory does not depend on the load).

    python benchmarks/bench_subsets.py                          # GPT-2-small shape, 4 samples per task
    python benchmarks/bench_subsets.py --samples 64 --calls interference  # factors and score tiles large
    python benchmarks/bench_subsets.py --memory-budget-gb 2     # another budget (default 4, the library's)
    python benchmarks/bench_subsets.py --smoke                  # tiny model, a few seconds
    python benchmarks/bench_subsets.py --device cuda            # on a GPU
"""

from __future__ import annotations

import argparse
import json
import math
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


def proc_status_gb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, in GB (Linux)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / GB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # no /proc: the lifetime peak


class StagePeaks:
    """Peak memory per stage of a call: :meth:`enter` closes the running stage's peak and starts the next one's."""

    def __init__(self, device: str, baseline: float):
        self.cuda, self.baseline, self.stage, self.peaks = device.startswith("cuda"), baseline, "", {}

    def _peak(self) -> float:
        return torch.cuda.max_memory_allocated() / GB if self.cuda else proc_status_gb("VmHWM") - self.baseline

    def _reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            with open("/proc/self/clear_refs", "w") as clear:  # VmHWM := VmRSS
                clear.write("5")

    def enter(self, stage: str) -> None:
        if self.stage:
            if self.cuda:
                torch.cuda.synchronize()
            self.peaks[self.stage] = max(self.peaks.get(self.stage, 0.0), self._peak())
        self._reset()
        self.stage = stage

    def around(self, stage: str, function):
        """``function``, its run counted as ``stage`` (then back to the stage it was called in)."""
        def counted(*args, **kwargs):
            outer = self.stage
            self.enter(stage)
            try:
                return function(*args, **kwargs)
            finally:
                self.enter(outer)
        return counted


def measure(kind: str, subset: bool, smoke: bool, device: str, samples: int = 0, budget_gb: float = 0.0) -> dict:
    """One measurement, in this process: seconds and memory of one call (``samples``: per task, 0: the shape's;
    ``budget_gb``: the interference's memory budget, 0: the default)."""
    from tl_circuits.freezing.sweep import freeze_sweep
    from tl_circuits.interference import engine
    from tl_circuits.interference.config import InterferenceConfig

    shape = dict(SMOKE if smoke else FULL)
    if samples:
        shape["n_samples"] = samples
    model = build(shape, device)
    a, b = tokens(shape, 0, device), tokens(shape, 1, device)
    last_two = [shape["n_layer"] - 2, shape["n_layer"] - 1]
    layers = last_two if subset else None

    config = InterferenceConfig(**({"memory_budget_gb": budget_gb} if budget_gb else {}))

    def call(short: bool = False):
        x, y = (a[:2, :8], b[:2, :8]) if short else (a, b)
        if kind == "sweep":
            return freeze_sweep(model, x, layers=layers, progress=False)
        return engine.compute_interference(model, x, y, layers=layers, config=config, progress=False)

    call(short=True)  # warm-up (allocator, kernels), not timed
    engine.release_free_memory()
    baseline = torch.cuda.memory_allocated() / GB if device.startswith("cuda") else proc_status_gb("VmRSS")
    peaks = StagePeaks(device, 0.0 if device.startswith("cuda") else baseline)
    # the engine's two stages, as run_engine calls them (module attributes, looked up at each call)
    engine.gradient_pass = peaks.around("gradient pass", engine.gradient_pass)  # type: ignore[assignment]
    engine.score_pass = peaks.around("score pass", engine.score_pass)  # type: ignore[assignment]
    peaks.enter("other")
    t0 = time.perf_counter()
    result = call()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peaks.enter("")
    plan = result.settings["plan"] if kind == "interference" else {}
    return {"seconds": seconds, "model_gb": baseline, "peak_gb": max(peaks.peaks.values()),
            "timings": result.settings["timings"] if kind == "interference" else {},
            "gradient_pass_gb": peaks.peaks.get("gradient pass", math.nan),
            "score_pass_gb": peaks.peaks.get("score pass", math.nan), "plan": plan}


def in_subprocess(kind: str, subset: bool, smoke: bool, device: str, samples: int = 0, budget_gb: float = 0.0) -> dict:
    args = [sys.executable, __file__, "--one", kind, "--device", device, "--samples", str(samples),
            "--memory-budget-gb", str(budget_gb)] + (["--subset"] if subset else []) + (["--smoke"] if smoke else [])
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
    parser.add_argument("--calls", choices=("sweep", "interference", "both"), default="both",
                        help="which calls to measure (default: both)")
    parser.add_argument("--memory-budget-gb", type=float, default=0.0,
                        help="the interference's memory_budget_gb (default: the library's)")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.subset, args.smoke, args.device, args.samples,
                                 args.memory_budget_gb)))
        return
    shape = dict(SMOKE if args.smoke else FULL)
    shape["n_samples"] = args.samples or shape["n_samples"]
    n = shape["n_layer"]
    print(f"GPT-2-shaped bridge: {n} layers x {shape['n_head']} heads, d_model {shape['n_embd']}, "
          f"{shape['n_positions']} positions, {shape['n_samples']} samples per task, device {args.device}")
    budget = f", memory budget {args.memory_budget_gb:g} GB" if args.memory_budget_gb else ""
    print(f"{'call':<34}{'full (baseline)':>16}{'last 2 layers':>14}{'ratio':>7}{'goal':>6}{budget}")

    def row(label: str, full, sub, goal: str = "") -> None:
        if isinstance(full, bool):  # the plan's spill
            print(f"{label:<34}{str(full):>16}{str(sub):>14}")
            return
        ratio = sub / full if full > 0 else math.nan
        print(f"{label:<34}{full:>16.4g}{sub:>14.4g}{ratio:>7.2f}{goal:>6}")

    for kind in ("sweep", "interference") if args.calls == "both" else (args.calls,):
        full = in_subprocess(kind, False, args.smoke, args.device, args.samples, args.memory_budget_gb)
        sub = in_subprocess(kind, True, args.smoke, args.device, args.samples, args.memory_budget_gb)
        row(f"{kind} time (s)", full["seconds"], sub["seconds"], "0.3" if kind == "sweep" else "0.5")
        if kind != "interference":
            continue
        for stage in ("gradients_s", "scoring_s"):
            row(f"  of which {stage}", full["timings"][stage], sub["timings"][stage])
        row("  peak above the model (GB)", full["peak_gb"], sub["peak_gb"], "0.5")
        row("    in the gradient pass", full["gradient_pass_gb"], sub["gradient_pass_gb"])
        row("    in the score pass", full["score_pass_gb"], sub["score_pass_gb"])
        row("  model + runtime (GB)", full["model_gb"], sub["model_gb"])
        row("  absolute peak (GB)", full["model_gb"] + full["peak_gb"], sub["model_gb"] + sub["peak_gb"])
        for key in ("engine_chunk", "layer_group", "factor_gb", "spill", "estimated_peak_gb"):
            row(f"  plan: {key}", full["plan"][key], sub["plan"][key])

if __name__ == "__main__":
    main()
