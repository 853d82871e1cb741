"""Benchmark: the streaming interference engine against kronfluence 1.0.1, and spilling against an unlimited budget.

Model: a GPT-2-small-shaped LLaMA built locally with HF ``LlamaConfig`` (12 layers, 12 heads, hidden 768,
intermediate 3072, vocab 1000, 64 tokens, random weights; tl_circuits sees it converted to a HookedTransformer),
32 train samples (task A) x 32 query samples (task B), random tokens.

1. **kronfluence** (``fit_all_factors`` with the diagonal strategy and the empirical Fisher, then
   ``compute_pairwise_scores`` per module, absolute damping 1e-8) and **tl_circuits**
   (``compute_interference``, signed variant, task-A Fisher, ``damping_abs=1e-8, damping_rel=0``, at the
   default memory budget) each run in their own process, one after the other, on the same threads; wall time
   and peak RSS come from ``/usr/bin/time -v``. kronfluence's per-module score of (query j, train i) is
   tl_circuits' score of (i, j) summed over the module's heads; the largest difference relative to the
   largest score is printed (goal <= 1e-5). Goals: tl_circuits <= 0.7x kronfluence's wall time and
   <= 0.5x its peak RSS.
2. **Spilling**: tl_circuits at a 1 GB budget (the gradient factors go to a memory-mapped file) against an
   unlimited (64 GB) budget, same run, each in its own process (goal <= 1.2x).

kronfluence is a benchmark-only dependency: ``pip install --no-deps kronfluence==1.0.1`` plus accelerate,
einconv, opt-einsum (it never imports torchvision despite its metadata). No assertions on time.

    python benchmarks/bench_engine.py                # full (~5 min on 2 CPU cores)
    python benchmarks/bench_engine.py --kronfluence-batch 8   # kronfluence in batches of 8
    python benchmarks/bench_engine.py --smoke        # tiny model, seconds (CI; kronfluence part if installed)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings

import torch

warnings.filterwarnings("ignore")

FULL = dict(n_layers=12, d_model=768, n_heads=12, d_mlp=3072, d_vocab=1000, n_pos=64, n=32)
SMOKE = dict(n_layers=2, d_model=32, n_heads=4, d_mlp=64, d_vocab=50, n_pos=16, n=6)
DAMPING = 1e-8


def hf_llama(shape: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=shape["d_vocab"], hidden_size=shape["d_model"], intermediate_size=shape["d_mlp"],
                      num_hidden_layers=shape["n_layers"], num_attention_heads=shape["n_heads"],
                      num_key_value_heads=shape["n_heads"], max_position_embeddings=shape["n_pos"],
                      rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    return LlamaForCausalLM(cfg).eval()


def hooked_llama(shape: dict):
    """The same weights as a HookedTransformer (TransformerLens's own LLaMA conversion)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights

    hf = hf_llama(shape)
    d_head = shape["d_model"] // shape["n_heads"]
    cfg = HookedTransformerConfig(
        n_layers=shape["n_layers"], d_model=shape["d_model"], n_heads=shape["n_heads"], d_head=d_head,
        d_mlp=shape["d_mlp"], n_ctx=shape["n_pos"], d_vocab=shape["d_vocab"], act_fn="silu",
        normalization_type="RMS", eps=1e-6, positional_embedding_type="rotary", rotary_adjacent_pairs=False,
        rotary_dim=d_head, rotary_base=10000, final_rms=True, gated_mlp=True,
        original_architecture="LlamaForCausalLM", device="cpu", init_weights=False)  # the HF weights are loaded
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(convert_llama_weights(hf, cfg), fold_ln=False, center_writing_weights=False,
                                      center_unembed=False, fold_value_biases=False)
    del hf
    return model.eval()


def tasks(shape: dict):
    gen = torch.Generator().manual_seed(1)
    half = shape["d_vocab"] // 2
    a = torch.randint(0, half, (shape["n"], shape["n_pos"]), generator=gen)
    b = torch.randint(half, shape["d_vocab"], (shape["n"], shape["n_pos"]), generator=gen)
    return a, b


# ----- the two sides, each in its own process ---------------------------------------------------------------

def side_tl_circuits(shape: dict, budget_gb, out: str) -> dict:
    from tl_circuits import GradientConfig, InterferenceConfig, compute_interference

    model = hooked_llama(shape)
    a, b = tasks(shape)
    gradients = GradientConfig(progress=False) if budget_gb is None else GradientConfig(memory_budget_gb=budget_gb,
                                                                                         progress=False)
    cfg = InterferenceConfig(gradients=gradients, variant="signed", fisher_source="a", damping_abs=DAMPING,
                             damping_rel=0.0)
    start = time.perf_counter()
    result = compute_interference(model, a, b, config=cfg)
    seconds = time.perf_counter() - start
    # per module (block, layer): sum over its heads, [N_A, N_B]
    per_module = {f"{blk}{layer}": result.scores[blk][:, :, layer].double().sum(-1)
                  for blk in "QKVO" for layer in range(shape["n_layers"])}
    torch.save(per_module, out)
    return {"seconds": seconds, "plan": result.settings["plan"], "timings": result.settings["timings"]}


def side_kronfluence(shape: dict, out: str, batch: int) -> dict:
    from kronfluence import Analyzer, FactorArguments, ScoreArguments, Task
    from torch.utils.data import TensorDataset

    model = hf_llama(shape)
    a, b = tasks(shape)
    names = {"Q": "q_proj", "K": "k_proj", "V": "v_proj", "O": "o_proj"}
    tracked = [f"model.layers.{layer}.self_attn.{names[blk]}" for layer in range(shape["n_layers"]) for blk in "QKVO"]

    def losses(batch, model):
        tokens = batch[0]
        logits = model(tokens).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1),
                                                reduction="none").view(tokens.shape[0], -1)
        return nll.mean(1)  # token-mean per sample, as tl_circuits' loss

    class LanguageModelling(Task):
        def compute_train_loss(self, batch, model, sample=False):
            return losses(batch, model).sum()

        def compute_measurement(self, batch, model):
            return losses(batch, model).sum()

        def get_influence_tracked_modules(self):
            return tracked

    from kronfluence.analyzer import prepare_model

    task = LanguageModelling()
    model = prepare_model(model, task)
    with tempfile.TemporaryDirectory() as folder:
        analyzer = Analyzer("bench", model, task, cpu=True, disable_tqdm=True, output_dir=folder)
        start = time.perf_counter()
        analyzer.fit_all_factors("f", TensorDataset(a), per_device_batch_size=batch,
                                 factor_args=FactorArguments(strategy="diagonal", use_empirical_fisher=True))
        analyzer.compute_pairwise_scores("s", "f", TensorDataset(b), TensorDataset(a),
                                         per_device_query_batch_size=batch,
                                         per_device_train_batch_size=batch,
                                         score_args=ScoreArguments(damping_factor=DAMPING,
                                                                   compute_per_module_scores=True))
        seconds = time.perf_counter() - start
        scores = analyzer.load_pairwise_scores("s")
    inverse = {v: k for k, v in names.items()}
    per_module = {}
    for name, s in scores.items():  # [n_query (B), n_train (A)] per module
        layer, proj = re.match(r"model\.layers\.(\d+)\.self_attn\.(\w+)", name).groups()
        per_module[f"{inverse[proj]}{layer}"] = s.double().T
    torch.save(per_module, out)
    return {"seconds": seconds}


# ----- the parent -------------------------------------------------------------------------------------------

def timed(args: list[str], threads: int) -> dict:
    """Run this script as ``/usr/bin/time -v python ... --side ...``: its JSON, wall seconds and peak RSS (GB)."""
    cmd = ["/usr/bin/time", "-v", sys.executable, __file__, *args, "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    stats = dict(re.findall(r"^\s*(.+?):\s+(.+)$", proc.stderr, flags=re.M))
    wall = stats["Elapsed (wall clock) time (h:mm:ss or m:ss)"].split(":")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_wall_s"] = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall)))
    result["peak_rss_gb"] = int(stats["Maximum resident set size (kbytes)"]) / 2**20
    return result


def compare(path_a: str, path_b: str) -> float:
    x, y = torch.load(path_a), torch.load(path_b)
    scale = max(float(v.abs().max()) for v in y.values())
    return max(float((x[k] - y[k]).abs().max()) for k in y) / scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model, seconds")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every run (default 2)")
    parser.add_argument("--skip-kronfluence", action="store_true")
    parser.add_argument("--kronfluence-batch", type=int, default=32,
                        help="kronfluence's per-device batch size (default 32: every sample of a task in one batch, "
                             "its fastest setting here)")
    parser.add_argument("--side", choices=["tl_circuits", "kronfluence"], help=argparse.SUPPRESS)
    parser.add_argument("--budget-gb", type=float, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shape = SMOKE if args.smoke else FULL
    if args.side == "tl_circuits":
        print(json.dumps(side_tl_circuits(shape, args.budget_gb, args.out)))
        return
    if args.side == "kronfluence":
        print(json.dumps(side_kronfluence(shape, args.out, args.kronfluence_batch)))
        return

    try:
        import kronfluence  # noqa: F401

        have_kronfluence = not args.skip_kronfluence
    except ImportError:
        have_kronfluence = False
    from tl_circuits import defaults

    size = ["--smoke"] if args.smoke else []
    print(f"tl_circuits engine benchmark: {'SMOKE (tiny model)' if args.smoke else 'GPT-2-small-shaped LLaMA'}: "
          f"{shape['n_layers']} layers x {shape['n_heads']} heads, d_model {shape['d_model']}, {shape['n_pos']} "
          f"tokens, vocab {shape['d_vocab']}, {shape['n']} x {shape['n']} samples; torch {torch.__version__}, "
          f"{args.threads} threads, {platform.processor() or platform.machine()}, load average "
          f"{os.getloadavg()[0]:.2f}\n")
    with tempfile.TemporaryDirectory() as folder:
        ours_path, theirs_path = os.path.join(folder, "ours.pt"), os.path.join(folder, "theirs.pt")
        ours = timed([*size, "--side", "tl_circuits", "--out", ours_path], args.threads)
        if have_kronfluence:
            theirs = timed([*size, "--side", "kronfluence", "--out", theirs_path, "--kronfluence-batch",
                            str(args.kronfluence_batch)], args.threads)
            diff = compare(ours_path, theirs_path)
            print(f"1. vs kronfluence 1.0.1 (diagonal factors, per-module pairwise scores, batch size "
                  f"{args.kronfluence_batch}), processes one after another")
            print(f"   kronfluence                        wall {theirs['process_wall_s']:7.1f} s   "
                  f"peak RSS {theirs['peak_rss_gb']:5.2f} GB")
            print(f"   tl_circuits (budget {defaults.MEMORY_BUDGET_GB:g} GB default) "
                  f"wall {ours['process_wall_s']:7.1f} s   "
                  f"peak RSS {ours['peak_rss_gb']:5.2f} GB")
            wall_ratio = ours["process_wall_s"] / theirs["process_wall_s"]
            print(f"   ratio tl_circuits / kronfluence:   wall {wall_ratio:.2f}x "
                  f"(goal <= 0.7x)   peak RSS {ours['peak_rss_gb'] / theirs['peak_rss_gb']:.2f}x (goal <= 0.5x)")
            print(f"   same scores: max |difference| / max |score| = {diff:.1e} (goal <= 1e-5)")
            print(f"   (in-process: kronfluence {theirs['seconds']:.1f} s, tl_circuits {ours['seconds']:.1f} s: "
                  f"gradients {ours['timings']['gradients_s']:.1f} s, scores {ours['timings']['scoring_s']:.1f} s)\n")
        else:
            print("1. kronfluence is not installed: comparison skipped\n")
        small = 0.05 if args.smoke else 1.0
        spill = timed([*size, "--side", "tl_circuits", "--budget-gb", str(small), "--out", ours_path], args.threads)
        big = timed([*size, "--side", "tl_circuits", "--budget-gb", "64", "--out", theirs_path], args.threads)
        print(f"2. spilling instead of recomputing: budget {small} GB vs 64 GB, same run")
        for label, r in ((f"{small} GB", spill), ("64 GB", big)):
            p = r["plan"]
            print(f"   {label:>7}: wall {r['process_wall_s']:7.1f} s   peak RSS {r['peak_rss_gb']:5.2f} GB   spilled "
                  f"{p['spill']}, {p['n_gradient_evaluations']} gradient evaluations, {p['layer_group']} layer(s) per "
                  f"contraction, tiles {p['tile_left']} x {p['tile_right']}")
        print(f"   ratio {small} GB / 64 GB: {spill['process_wall_s'] / big['process_wall_s']:.2f}x (goal <= 1.2x); "
              f"scores equal to {compare(ours_path, theirs_path):.1e}")


if __name__ == "__main__":
    main()
