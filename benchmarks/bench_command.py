"""Benchmark: the command's interference stage on a GPT-2-small-shaped checkpoint, default settings and budget.

What ``tl-circuits --model CHECKPOINT`` runs after its freeze sweeps: per-sample gradients of 64 + 64 samples,
the pooled A ∪ B × A ∪ B score matrix under the pooled Fisher (through the one streaming engine), and the
permutation test with the default number of permutations and bootstrap resamples
(:func:`tl_circuits.cli.analysis.run_interference` with ``AnalysisConfig()``). The model is a
GPT-2-small-shaped HookedTransformer (12 layers x 12 heads, d_model 768, d_mlp 3072, vocab 50257, 64
positions, random weights) saved as a local checkpoint and loaded the way the command loads it.

It runs in its own process under ``/usr/bin/time -v`` and reports the peak RSS above the RSS right after the
model and tasks are loaded, against the default memory budget (goal: within the budget + 10%). The sweeps are
left out: at this size they take ~30 minutes per task on 2 cores (``--with-command`` runs the whole command,
sweeps included).

    python benchmarks/bench_command.py            # ~2-4 min on 2 CPU cores
    python benchmarks/bench_command.py --smoke    # tiny model (CI)
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
import warnings

import torch

warnings.filterwarnings("ignore")

FULL = dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257, n_ctx=64, n=64)
SMOKE = dict(n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, d_vocab=50, n_ctx=16, n=8)


def rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def make_checkpoint(shape: dict, folder: str) -> None:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from tl_circuits.models.checkpoint import save_checkpoint

    cfg = HookedTransformerConfig(n_layers=shape["n_layers"], d_model=shape["d_model"], n_heads=shape["n_heads"],
                                  d_head=shape["d_head"], d_mlp=shape["d_mlp"], n_ctx=shape["n_ctx"],
                                  d_vocab=shape["d_vocab"], act_fn="gelu", normalization_type="LN", seed=0)
    save_checkpoint(HookedTransformer(cfg), folder)


def child(shape: dict, folder: str) -> dict:
    from tl_circuits import defaults
    from tl_circuits.cli.analysis import AnalysisConfig, run_interference
    from tl_circuits.cli.task_files import task_from_batch
    from tl_circuits.bundled.tasks import TaskBatch
    from tl_circuits.models.checkpoint import load_checkpoint

    model = load_checkpoint(folder)
    gen = torch.Generator().manual_seed(0)
    half = shape["d_vocab"] // 2
    scored = torch.ones(shape["n"], shape["n_ctx"], dtype=torch.bool)
    scored[:, -1] = False  # the last position predicts nothing
    batches = [TaskBatch(torch.randint(lo, hi, (shape["n"], shape["n_ctx"]), generator=gen), scored, "random")
               for lo, hi in ((1, half), (half, shape["d_vocab"]))]
    task_a, task_b = (task_from_batch(b, name, "random") for b, name in zip(batches, ("a", "b")))
    import dataclasses

    config = AnalysisConfig()  # the command's defaults, quiet
    config = dataclasses.replace(config, interference=config.interference.with_progress(False))
    baseline = rss_gb()
    start = time.perf_counter()
    interference, statistics = run_interference(model, task_a, task_b, config)
    return {"seconds": time.perf_counter() - start, "baseline_rss_gb": baseline,
            "budget_gb": config.interference.memory_budget_gb, "default_budget_gb": defaults.MEMORY_BUDGET_GB,
            "plan": interference.settings["plan"], "timings": interference.settings["timings"],
            "n_permutations": statistics.n_permutations}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--with-command", action="store_true", help="also run the whole command (sweeps included)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = SMOKE if args.smoke else FULL
    if args.child:
        print(json.dumps(child(shape, args.child)))
        return
    with tempfile.TemporaryDirectory() as folder:
        make_checkpoint(shape, folder)
        cmd = ["/usr/bin/time", "-v", sys.executable, __file__, "--child", folder, "--threads", str(args.threads)]
        proc = subprocess.run(cmd + (["--smoke"] if args.smoke else []), capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr[-3000:])
        peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) / 2**20
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        above, budget = peak - r["baseline_rss_gb"], r["budget_gb"]
        p = r["plan"]
        print(f"command's interference stage, {'SMOKE' if args.smoke else 'GPT-2-small-shaped checkpoint'} "
              f"(vocab {shape['d_vocab']}), {shape['n']} + {shape['n']} samples, defaults (budget {budget:g} GB, "
              f"{r['n_permutations']} permutations); {args.threads} threads")
        print(f"   wall {r['seconds']:.1f} s (gradients {r['timings']['gradients_s']:.1f} s, pooled scores "
              f"{r['timings']['scoring_s']:.1f} s, the rest the permutation test and bootstrap)")
        print(f"   peak RSS {peak:.2f} GB, {above:.2f} GB above the loaded model and tasks "
              f"({r['baseline_rss_gb']:.2f} GB)"
              f"   budget {budget:g} GB: {'within' if above <= 1.1 * budget else 'OVER'} budget + 10%")
        print(f"   plan: factors {p['factor_gb']:.2f} GB spilled {p['spill']}, {p['n_gradient_evaluations']} gradient "
              f"evaluations, tiles {p['tile_left']} x {p['tile_right']}, {p['layer_group']} layer(s) per contraction, "
              f"estimated peak {p['estimated_peak_gb']:.2f} GB")
        if args.with_command:
            start = time.perf_counter()
            out = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "tl_circuits", "--model", folder,
                                  "--quiet", "--out", f"{folder}/report"], capture_output=True, text=True)
            peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr)
            print(f"   whole command: exit {out.returncode}, {time.perf_counter() - start:.0f} s, peak RSS "
                  f"{int(peak.group(1)) / 2**20 if peak else float('nan'):.2f} GB")


if __name__ == "__main__":
    main()
