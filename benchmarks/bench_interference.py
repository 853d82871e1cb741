"""Benchmark: QK-OV interference end to end vs the gradient floor, batched scoring vs a Python loop, peak RSS.

Model: a GPT-2-small-shaped HookedTransformer (12 layers, 12 heads, d_model 768, d_mlp 3072, 64 positions,
vocab 1000, random weights), random tokens. Printed side by side in one run:

1. end-to-end ``compute_interference`` (per-sample gradients, Fisher of A, all 4 blocks x 12 x 12 scores for
   N_A x N_B pairs) vs the *gradient floor*: a plain per-sample ``loss.backward()`` loop over the same
   N_A + N_B samples with only the attention weights requiring grad (goal: <= 1.25x);
2. the scoring phase vs the original's design — a Python loop over pairs, blocks, layers and heads that
   slices C_i, F and g_j and sums (timed on a subset of cells, scaled to all N_A x N_B x 576 cells) (goal:
   >= 1000x faster);
3. peak RSS of ``compute_interference`` at N_A = N_B = 400 against its memory budget (goal: under it).

Each full-size measurement runs in its own subprocess, so peak RSS (``ru_maxrss``) belongs to it. The budget
covers what tl_circuits allocates, not the interpreter, torch and the model, so RSS is reported both above the
process's baseline (after building the model and a warm-up) and in absolute terms. No assertions on time.

    python benchmarks/bench_interference.py            # full (~15-30 min on 2 CPU cores)
    python benchmarks/bench_interference.py --smoke    # tiny model, a few seconds (CI)
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
import warnings

import torch

warnings.filterwarnings("ignore", category=DeprecationWarning)

from transformer_lens import HookedTransformer, HookedTransformerConfig  # noqa: E402

from tl_circuits import GradientConfig, InterferenceConfig, compute_interference  # noqa: E402
from tl_circuits.interference.fisher import damped, fisher_from_gradients  # noqa: E402
from tl_circuits.interference.gradients import per_sample_gradients  # noqa: E402
from tl_circuits.interference.scoring import pairwise_scores  # noqa: E402
from tl_circuits.models.spec import BLOCKS, model_spec  # noqa: E402

GB = 2**30
FULL = dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=1000, n_pos=64)
SMOKE = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=50, n_pos=16)


def build(shape: dict) -> HookedTransformer:
    cfg = HookedTransformerConfig(n_layers=shape["n_layers"], d_model=shape["d_model"], n_heads=shape["n_heads"],
                                  d_head=shape["d_head"], d_mlp=shape["d_mlp"], n_ctx=shape["n_pos"],
                                  d_vocab=shape["d_vocab"], act_fn="gelu", normalization_type="LN", seed=0,
                                  device="cpu")
    return HookedTransformer(cfg).eval()


def tasks(shape: dict, n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    half = shape["d_vocab"] // 2  # task A: low token ids, task B: high ones
    a = torch.randint(0, half, (n, shape["n_pos"]), generator=gen)
    b = torch.randint(half, shape["d_vocab"], (n, shape["n_pos"]), generator=gen)
    return a, b


def rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


# ----- phases (each returns a JSON-able dict) ---------------------------------------------------------------

def phase_floor(shape: dict, n: int) -> dict:
    """Plain per-sample loss.backward() over 2n samples, only attention weights requiring grad."""
    model = build(shape)
    names = set(model_spec(model).attention_param_names())
    for name, p in model.named_parameters():
        p.requires_grad_(name in names)
    a, b = tasks(shape, n)
    samples = torch.cat([a, b])
    model(samples[:1], return_type="loss").backward()  # warm-up
    start = time.perf_counter()
    for i in range(samples.shape[0]):
        model.zero_grad(set_to_none=True)
        model(samples[i:i + 1], return_type="loss").backward()
    return {"seconds": time.perf_counter() - start, "n_samples": samples.shape[0]}


def phase_e2e(shape: dict, n: int, budget_gb: float) -> dict:
    model = build(shape)
    a, b = tasks(shape, n)
    cfg = InterferenceConfig(gradients=GradientConfig(memory_budget_gb=budget_gb, progress=False), variant="unsigned")
    compute_interference(model, a[:2], b[:2], config=cfg)
    baseline = rss_gb()
    start = time.perf_counter()
    result = compute_interference(model, a, b, config=cfg)
    seconds = time.perf_counter() - start
    assert all(not bool(torch.isnan(s).any()) for s in result.scores.values())
    return {"seconds": seconds, "timings": result.settings["timings"], "plan": result.settings["plan"],
            "baseline_rss_gb": baseline, "peak_rss_gb": peak_rss_gb(), "budget_gb": budget_gb,
            "most_conflicted_block": result.most_conflicted_block}


def phase_scoring(shape: dict, n_sub: int, loop_pairs: int) -> dict:
    """Batched pairwise_scores vs the original's per-pair/per-block/per-layer/per-head loop, same gradients."""
    model = build(shape)
    a, b = tasks(shape, n_sub)
    cfg = GradientConfig(memory_budget_gb=64, progress=False)
    ga, gb = per_sample_gradients(model, a, config=cfg), per_sample_gradients(model, b, config=cfg)
    fisher = fisher_from_gradients(ga)
    pairwise_scores(ga.select(slice(0, 1)), gb.select(slice(0, 1)), fisher, "unsigned", memory_budget_gb=64)  # warm-up
    times = []
    for _ in range(3):
        start = time.perf_counter()
        batched = pairwise_scores(ga, gb, fisher, "unsigned", memory_budget_gb=64)
        times.append(time.perf_counter() - start)
    f_tilde = {k: v.float() for k, v in damped(fisher).items()}
    spec = model_spec(model)
    cells, start = 0, time.perf_counter()
    loop_scores = {}
    for i in range(loop_pairs):  # the original's design: one pair, one block, one layer, one head at a time
        for j in range(1):
            for block in BLOCKS:
                for layer in range(spec.n_layers):
                    for head in range(spec.n_block_heads(block)):
                        c = ga.per_block[block][i, layer, head] ** 2
                        g = gb.per_block[block][j, layer, head].abs()
                        loop_scores[i, j, block, layer, head] = float((c / f_tilde[block][layer, head] * g).sum())
                        cells += 1
    loop_seconds = time.perf_counter() - start
    worst = max(abs(v - float(batched[blk][i, j, l, h])) / max(abs(v), 1e-30)
                for (i, j, blk, l, h), v in loop_scores.items())
    n_cells_per_pair = sum(spec.n_layers * spec.n_block_heads(blk) for blk in BLOCKS)
    return {"batched_seconds": min(times), "n_pairs": n_sub * n_sub, "loop_seconds": loop_seconds,
            "loop_cells": cells, "cells_per_pair": n_cells_per_pair, "max_rel_diff": worst}


PHASES = {"floor": phase_floor, "e2e": phase_e2e, "scoring": phase_scoring}


def run_phase(name: str, in_process: bool, **kwargs) -> dict:
    if in_process:
        return PHASES[name](**kwargs)
    cmd = [sys.executable, __file__, "--phase", name, "--kwargs", json.dumps(kwargs), "--threads",
           str(torch.get_num_threads())]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model, a few seconds, in one process")
    parser.add_argument("--n", type=int, default=None, help="samples per task (default 100)")
    parser.add_argument("--budget-gb", type=float, default=None, help="memory budget of the N-sample run")
    parser.add_argument("--n-rss", type=int, default=None, help="samples per task of the peak-RSS run (400)")
    parser.add_argument("--rss-budget-gb", type=float, default=None, help="memory budget of the peak-RSS run")
    parser.add_argument("--skip-rss", action="store_true", help="skip the peak-RSS run")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared CPU, more threads than free cores make "
                             "OpenMP spin and timings swing by 10x)")
    parser.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    parser.add_argument("--kwargs", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.phase:  # a subprocess of the full run
        print(json.dumps(PHASES[args.phase](**json.loads(args.kwargs))))
        return

    shape = SMOKE if args.smoke else FULL
    n = args.n or (6 if args.smoke else 100)
    budget = args.budget_gb or (0.05 if args.smoke else 6.0)
    n_rss = args.n_rss or (12 if args.smoke else 400)
    rss_budget = args.rss_budget_gb or (0.05 if args.smoke else 8.0)
    n_sub, loop_pairs = (3, 2) if args.smoke else (8, 2)
    inline = args.smoke

    print(f"tl_circuits interference benchmark — {'SMOKE (tiny model)' if args.smoke else 'GPT-2-small shape'}: "
          f"{shape['n_layers']} layers x {shape['n_heads']} heads, d_model {shape['d_model']}, "
          f"{shape['n_pos']} positions, vocab {shape['d_vocab']}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print("(timings on a shared CPU are noisy; ratios within one run are what to read)\n")

    floor = run_phase("floor", inline, shape=shape, n=n)
    e2e = run_phase("e2e", inline, shape=shape, n=n, budget_gb=budget)
    ratio = e2e["seconds"] / floor["seconds"]
    t = e2e["timings"]
    print(f"1. end to end, N_A = N_B = {n}, memory_budget_gb = {budget}")
    print(f"   gradient floor (loss.backward loop, {floor['n_samples']} samples)  {floor['seconds']:9.2f} s")
    print(f"   compute_interference (gradients, Fisher, 4 x {shape['n_layers']} x {shape['n_heads']} scores)"
          f"  {e2e['seconds']:9.2f} s   {ratio:5.2f}x the floor   (goal <= 1.25x)")
    print(f"     of which: gradients {t['gradients_s']:.2f} s, "
          f"Fisher and scoring (rows from factors + contractions) {t['scoring_s']:.2f} s")
    p = e2e["plan"]
    print(f"     plan: {p['n_gradient_evaluations']} gradient evaluations, factors spilled {p['spill']}, "
          f"{p['layer_group']} layer(s) per contraction, tiles {p['tile_left']} x {p['tile_right']}")
    print(f"     peak RSS {e2e['peak_rss_gb'] - e2e['baseline_rss_gb']:.3f} GB above baseline "
          f"({e2e['peak_rss_gb']:.2f} GB absolute) vs budget {budget} GB\n")

    sc = run_phase("scoring", inline, shape=shape, n_sub=n_sub, loop_pairs=loop_pairs)
    batched_per_pair = sc["batched_seconds"] / sc["n_pairs"]
    loop_per_cell = sc["loop_seconds"] / sc["loop_cells"]
    loop_per_pair = loop_per_cell * sc["cells_per_pair"]
    loop_total = loop_per_pair * n * n
    print(f"2. scoring phase ({sc['cells_per_pair']} (block, layer, head) cells per pair)")
    print(f"   same gradients, {n_sub} x {n_sub} pairs: batched pairwise_scores {batched_per_pair * 1e3:9.3f} ms/pair"
          f"   Python loop (original design, {sc['loop_cells']} cells timed) {loop_per_pair * 1e3:9.1f} ms/pair"
          f"   {loop_per_pair / batched_per_pair:8.0f}x   (max rel. diff {sc['max_rel_diff']:.1e})")
    print(f"   at {n} x {n} pairs: scoring in compute_interference {t['scoring_s']:9.2f} s (measured)   "
          f"Python loop {loop_total:9.0f} s (scaled)   {loop_total / t['scoring_s']:8.0f}x   (goal >= 1000x)\n")

    if args.skip_rss:
        return
    rss = run_phase("e2e", inline, shape=shape, n=n_rss, budget_gb=rss_budget)
    above = rss["peak_rss_gb"] - rss["baseline_rss_gb"]
    p = rss["plan"]
    print(f"3. peak RSS, N_A = N_B = {n_rss}, memory_budget_gb = {rss_budget}")
    print(f"   peak RSS {above:.3f} GB above baseline ({rss['peak_rss_gb']:.2f} GB absolute, baseline "
          f"{rss['baseline_rss_gb']:.2f} GB)   budget {rss_budget} GB   "
          f"{'UNDER' if above <= rss_budget else 'OVER'} the budget (plan's estimate {p['estimated_peak_gb']:.2f} GB)"
          + ("  [smoke: RSS moves in allocator pages; this line means nothing at this size]" if args.smoke else ""))
    print(f"   wall {rss['seconds']:.1f} s; plan: {p['n_gradient_evaluations']} gradient evaluations for "
          f"{2 * n_rss} samples, factors spilled {p['spill']}, Fisher pass {p['fisher_pass']}, "
          f"tiles {p['tile_left']} x {p['tile_right']}")


if __name__ == "__main__":
    main()
