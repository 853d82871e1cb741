"""Benchmark: the gradient pass with a loss mask and with a custom loss_fn against the unmasked pass (issue #21).

Model: a GPT-2-small-shaped GPT-2 (12 layers, 12 heads, d_model 768, d_mlp 3072, 64 positions, vocab 1000, random
weights) as a TransformerBridge, so it runs on TransformerLens 3.x and 4.x alike. N_A = N_B tasks of random tokens.
The same ``compute_interference`` run is timed three ways, side by side and interleaved (unmasked, masked, custom,
unmasked, ...), and its gradient pass (``settings["timings"]["gradients_s"]``: every sample's forward/backward and
factors) compared:

1. **unmasked**: every valid target (the default loss);
2. **masked**: ``loss_mask_a/b`` counting the second half of each sample's predictions (a prompt's completion);
   goal <= 1.05x the unmasked pass;
3. **custom loss_fn**: a per-sample logit difference at the counted predictions against each sample's own foil
   token (looked up by ``samples``), with the same mask; goal <= 1.10x.

The median over ``--repeats`` rounds of each ratio is printed. No assertions on time.

    python benchmarks/bench_loss.py            # full (a few minutes on 2 CPU cores)
    python benchmarks/bench_loss.py --smoke    # tiny model, seconds (CI)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import warnings

import torch

warnings.filterwarnings("ignore")

FULL = dict(n_layers=12, d_model=768, n_heads=12, d_mlp=3072, d_vocab=1000, n_pos=64, n=16)
SMOKE = dict(n_layers=2, d_model=32, n_heads=4, d_mlp=64, d_vocab=50, n_pos=16, n=4)


def bridge(shape: dict):
    from transformer_lens.model_bridge.sources._bridge_builder import build_bridge_from_module
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=shape["d_vocab"], n_positions=shape["n_pos"], n_embd=shape["d_model"],
                     n_layer=shape["n_layers"], n_head=shape["n_heads"], n_inner=shape["d_mlp"])
    cfg._attn_implementation = "eager"
    hf = GPT2LMHeadModel(cfg).eval()
    return build_bridge_from_module(hf, architecture="GPT2LMHeadModel", hf_config=hf.config).eval()


def tasks(shape: dict):
    gen = torch.Generator().manual_seed(1)
    half = shape["d_vocab"] // 2
    n, pos = shape["n"], shape["n_pos"]
    a = torch.randint(0, half, (n, pos), generator=gen)
    b = torch.randint(half, shape["d_vocab"], (n, pos), generator=gen)
    loss_mask = torch.zeros(n, pos, dtype=torch.long)
    loss_mask[:, pos // 2:pos - 1] = 1  # the second half's predictions: a completion
    foils = torch.randint(0, shape["d_vocab"], (n,), generator=gen)
    return a, b, loss_mask, foils


def logit_difference(foils: torch.Tensor):
    def loss_fn(logits, tokens, *, loss_mask, samples):
        right = logits[:, :-1].gather(-1, tokens[:, 1:, None])[..., 0]
        foil = foils.to(samples.device)[samples]
        wrong = logits[:, :-1].gather(-1, foil[:, None, None].expand(-1, logits.shape[1] - 1, 1))[..., 0]
        counted = loss_mask[:, :-1].float()
        return ((wrong - right) * counted).sum(-1) / counted.sum(-1)
    return loss_fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model, seconds")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3; smoke: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from tl_circuits import GradientConfig, InterferenceConfig, compute_interference

    shape = SMOKE if args.smoke else FULL
    repeats = 1 if args.smoke else args.repeats
    model = bridge(shape)
    a, b, loss_mask, foils = tasks(shape)
    cfg = InterferenceConfig(gradients=GradientConfig(progress=False))
    variants = {
        "unmasked": {},
        "masked": dict(loss_mask_a=loss_mask, loss_mask_b=loss_mask),
        "custom loss_fn": dict(loss_mask_a=loss_mask, loss_mask_b=loss_mask, loss_fn_a=logit_difference(foils),
                               loss_fn_b=logit_difference(foils)),
    }
    print(f"tl_circuits loss benchmark: {'SMOKE (tiny model)' if args.smoke else 'GPT-2-small-shaped GPT-2 bridge'}: "
          f"{shape['n_layers']} layers x {shape['n_heads']} heads, d_model {shape['d_model']}, {shape['n_pos']} "
          f"tokens, vocab {shape['d_vocab']}, {shape['n']} + {shape['n']} samples; torch {torch.__version__}, "
          f"{args.threads} threads, {platform.processor() or platform.machine()}, load average "
          f"{os.getloadavg()[0]:.2f}\n")
    compute_interference(model, a[:2], b[:2], config=cfg)  # warm-up (lazy hooks, allocator)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, kwargs in variants.items():
            result = compute_interference(model, a, b, config=cfg, **kwargs)
            seconds[name].append(result.settings["timings"]["gradients_s"])
    base = seconds["unmasked"]
    for name, goal in (("unmasked", None), ("masked", 1.05), ("custom loss_fn", 1.10)):
        ratios = [t / b0 for t, b0 in zip(seconds[name], base)]
        line = f"   {name:<15} gradient pass {statistics.median(seconds[name]):7.2f} s"
        if goal is not None:
            line += f"   ratio to unmasked {statistics.median(ratios):.3f}x (goal <= {goal:.2f}x)"
        print(line)
    print(f"\n   (median of {repeats} interleaved round(s); each round runs the three variants one after another)")


if __name__ == "__main__":
    main()
