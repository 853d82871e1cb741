"""How good are the attribution sweep's first-order estimates? Compared with the exact freeze sweep, per (model, task,
replacement, circuit): Spearman's rho (signed estimate vs exact effect), top-10% recall (of the cells with the largest
|exact effect|, the share among the largest |estimate|), and the share of cells one must verify, largest |estimate|
first, to have verified every true top-10% cell. Results go into docs/attribution.md.

Methods compared (one exact sweep and one forward + backward per estimate):

- ``plain``: attribution patching, the softmax linearised (``qk_alpha=0``);
- ``atp*``: the exact frozen pattern, linear from the pattern on (``qk_alpha=1``, the default);
- ``alpha=0.5``: the logit path halfway, scaled (the interpolated-replacement lever);
- ``graddrop``: AtP*'s GradDrop ranking score (unsigned: Spearman of |score| vs |exact|);
- ``downstream``: 2-layer attention-only models only: AtP* with the layer-1 patterns recomputed exactly for each
  layer-0 head (the "recompute downstream patterns" lever; one layer-1 forward per head).
(For OV, plain = atp* = alpha: the QK levers do not touch OV.)

Models: the three bundled models on their own tasks (scored loss), a briefly trained induction-counting model
(HookedTransformer only: needs the TransformerLens 3 leg), and random-weight GPT-2-small and LLaMA-GQA shapes with a
smaller vocabulary (random tokens, mean next-token loss).

    /work/main/.venv-tl3/bin/python scripts/attribution_accuracy.py --out results.json   # everything (~1 h on 2 CPUs)
    python scripts/attribution_accuracy.py --smoke                                     # seconds
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's tests/ and tl_circuits/

from tl_circuits import compute_mean_activations, freeze_sweep, load_bundled_model
from tl_circuits.bundled import bundled_tasks, list_bundled_models
from tl_circuits.bundled.task_metrics import scored_loss_metric
from tl_circuits.freezing.first_order import first_order_pass

REPLACEMENTS = ("resample", "mean", "zero")
TOP_SHARE = 0.1


@dataclass
class Case:
    model_name: str
    task: str
    model: object
    tokens: torch.Tensor
    corrupted: torch.Tensor
    metric: Optional[Callable]


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() < 3 or float(a.std()) == 0 or float(b.std()) == 0:
        return float("nan")
    return float(spearmanr(a.numpy(), b.numpy())[0])


def top(values: torch.Tensor, k: int) -> set:
    return set(values.abs().argsort(descending=True, stable=True)[:k].tolist())


def scores(estimate: torch.Tensor, exact: torch.Tensor, unsigned: bool = False) -> dict:
    """Spearman, top-10% recall and the verify share that recovers every true top-10% cell."""
    e, x = estimate.flatten().double(), exact.flatten().double()
    k = max(1, math.ceil(TOP_SHARE * x.numel()))
    truth = top(x, k)
    order = e.abs().argsort(descending=True, stable=True).tolist()
    needed = max(order.index(i) for i in truth) + 1
    rho = spearman(e.abs(), x.abs()) if unsigned else spearman(e, x)
    return dict(spearman=rho, recall=len(truth & top(e, k)) / k, verify_share=needed / x.numel(), k=k)


def downstream_estimates(model, tokens, metric, replacement, reference, estimate) -> Optional[dict]:
    """AtP* with layer 1's patterns recomputed exactly for each layer-0 head (2-layer attention-only
    HookedTransformers): the direct and value paths linear (gradient with layer-1 patterns detached), plus
    ∂metric/∂P₁ · (P₁ under the head's freeze − P₁ clean)."""
    from tl_circuits.freezing import freeze_hooks

    cfg = getattr(model, "cfg", None)
    if cfg is None or type(model).__name__ != "HookedTransformer" or cfg.n_layers != 2 or not cfg.attn_only:
        return None
    pattern1, z0 = "blocks.1.attn.hook_pattern", "blocks.0.attn.hook_z"
    grads, saved = {}, {}

    def probe(name):
        def hook(act, hook):
            saved[name] = act.detach()
            p = torch.zeros_like(act, requires_grad=True)
            grads[name] = p
            return act + p
        return hook

    def detach(act, hook):
        return act.detach()

    out = {}
    for circuit in ("qk", "ov"):
        # ∂m/∂P₁ at the clean run, and ∂m/∂z₀ with layer-1 patterns detached (direct and value paths only)
        with torch.enable_grad():
            value = metric(model.run_with_hooks(tokens, fwd_hooks=[(pattern1, probe(pattern1))]))
            d_pattern = torch.autograd.grad(value if value.ndim == 0 else value.nansum(), grads[pattern1])[0]
            value = metric(model.run_with_hooks(tokens, fwd_hooks=[(pattern1, detach), (z0, probe(z0))]))
            d_z0 = torch.autograd.grad(value if value.ndim == 0 else value.nansum(), grads[z0])[0]
        grid = estimate[circuit].clone().double()
        for head in range(cfg.n_heads):
            with model.hooks(fwd_hooks=freeze_hooks(model, [(0, head)], circuit, replacement, reference=reference)):
                _, cache = model.run_with_cache(tokens, names_filter=lambda n: n in (pattern1, z0))
            delta_z0 = (cache[z0] - saved[z0])[:, :, head]
            direct = (d_z0[:, :, head].double() * delta_z0.double()).sum()
            patterns = (d_pattern.double() * (cache[pattern1] - saved[pattern1]).double()).sum()
            grid[0, head] = direct + patterns
        out[circuit] = grid
    return out


def evaluate(case: Case, replacement: str, progress: bool) -> list[dict]:
    model, tokens = case.model, case.tokens
    reference = None
    if replacement == "resample":
        reference = case.corrupted
    elif replacement == "mean":
        reference = compute_mean_activations(model, case.corrupted, progress=False)
    start = time.perf_counter()
    exact = freeze_sweep(model, tokens, case.metric, circuits=("qk", "ov"), replacement=replacement,
                         reference=reference, progress=progress)
    exact_s = time.perf_counter() - start
    estimates, seconds = {}, {}
    for name, alpha, graddrop in (("plain", 0.0, False), ("alpha=0.5", 0.5, False), ("atp*", 1.0, True)):
        start = time.perf_counter()
        out = first_order_pass(model, tokens, case.metric, circuits=("qk", "ov"), replacement=replacement,
                               reference=reference, qk_alpha=alpha, graddrop=graddrop)
        seconds[name] = time.perf_counter() - start
        estimates[name] = out.estimate
        if graddrop:
            estimates["graddrop"] = out.graddrop
    downstream = downstream_estimates(model, tokens, case.metric, replacement, reference, estimates["atp*"])
    if downstream is not None:
        estimates["downstream"] = downstream
    rows = []
    for circuit in ("qk", "ov"):
        for method, grids in estimates.items():
            row = dict(model=case.model_name, task=case.task, replacement=replacement, circuit=circuit,
                       method=method, n_cells=exact.effect[circuit].numel(),
                       max_abs_effect=float(exact.effect[circuit].abs().max()), exact_s=exact_s,
                       estimate_s=seconds.get(method, float("nan")),
                       **scores(grids[circuit], exact.effect[circuit], unsigned=method == "graddrop"))
            rows.append(row)
            print(f"{case.model_name:>24} {case.task:>14} {replacement:>8} {circuit} {method:>10}: "
                  f"rho {row['spearman']:+.2f} recall {row['recall']:.2f} verify {row['verify_share']:.2f} "
                  f"(max |effect| {row['max_abs_effect']:.3g})", flush=True)
    return rows


def bundled_cases(smoke: bool) -> list[Case]:
    cases = []
    n = 4 if smoke else 16
    for info in list_bundled_models():
        model = load_bundled_model(info.name)
        for task, make in bundled_tasks(info.name).items():
            batch, corrupted = make(n, seed=0), make(4 * n, seed=1)
            cases.append(Case(info.name, task, model, batch.tokens, corrupted.tokens, scored_loss_metric(batch)))
            if smoke:
                return cases
    return cases


def _resample_pairs(case: Case) -> Case:
    """RESAMPLE needs one corrupted row per clean row: the first N rows of the corrupted batch."""
    return Case(case.model_name, case.task, case.model, case.tokens, case.corrupted[:case.tokens.shape[0]],
                case.metric)


def random_cases(smoke: bool, vocab: int) -> list[Case]:
    from tests import builders

    gen = torch.Generator().manual_seed(0)
    shapes = {"gpt2-small-shape": dict(n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, act_fn="gelu_new",
                                       normalization_type="LN", positional_embedding_type="standard"),
              "llama-gqa-shape": dict(n_layers=8, d_model=512, n_heads=8, n_key_value_heads=2, d_head=64, d_mlp=1376,
                                      act_fn="silu", gated_mlp=True, normalization_type="RMS", final_rms=True,
                                      positional_embedding_type="rotary", rotary_dim=64)}
    cases = []
    for name, shape in shapes.items():
        if smoke:
            shape = dict(shape, n_layers=2, d_model=64, d_head=16, n_heads=4, d_mlp=128,
                         **({"rotary_dim": 16} if "rotary_dim" in shape else {}))
        if builders.HAS_HOOKED_TRANSFORMER:
            model = builders.hooked(0, biases=False, n_ctx=64, d_vocab=vocab, **shape)
        else:
            print(f"skipping {name}: the random shapes are built as HookedTransformers (TransformerLens 3 leg)")
            continue
        batch, pos = (4, 12) if smoke else (8, 32)
        tokens = torch.randint(0, vocab, (batch, pos), generator=gen)
        corrupted = torch.randint(0, vocab, (4 * batch, pos), generator=gen)
        cases.append(Case(name, "random tokens", model, tokens, corrupted, None))
    return cases


def trained_case(smoke: bool, steps: int) -> list[Case]:
    """induction-counting-2l's training for ``steps`` steps only (not saturated), and the same with 4 layers of 8
    heads and MLPs (more cells, so top-10% recall means more than one cell)."""
    from tests import builders

    if not builders.HAS_HOOKED_TRANSFORMER:
        print("skipping the briefly trained models: training builds a HookedTransformer (TransformerLens 3 leg)")
        return []
    import dataclasses

    from tl_circuits.bundled.training import BUNDLED_CONFIGS, train_model

    base = BUNDLED_CONFIGS["induction-counting-2l"]
    wider = dataclasses.replace(base, name="induction-counting-4l8h", model=dict(
        base.model, n_layers=4, n_heads=8, d_head=16, d_model=128, d_mlp=512, attn_only=False, act_fn="gelu"))
    cases = []
    for config in (base, wider):
        log: list = []
        model = train_model(config, steps=10 if smoke else steps, log=log)
        name = f"{config.name} trained {steps} steps"
        print(f"{name}: final training loss {log[-1][1]}", flush=True)
        for task, make in bundled_tasks("induction-counting-2l").items():
            n = 4 if smoke else 16
            batch, corrupted = make(n, seed=0), make(4 * n, seed=1)
            cases.append(Case(name, task, model, batch.tokens, corrupted.tokens, scored_loss_metric(batch)))
        if smoke:
            break
    return cases


def markdown(rows: list[dict]) -> str:
    """One table per model: a row per (task, replacement, circuit), each method's Spearman / top-10% recall, AtP*'s
    verify share, and the largest |exact effect|."""
    methods = [m for m in ("plain", "atp*", "alpha=0.5", "graddrop", "downstream")
               if any(r["method"] == m for r in rows)]
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        header = (["task", "repl.", "circuit", "cells"] + [f"{m} ρ / recall" for m in methods]
                  + ["atp* verify", "max |effect|"])
        out += [f"**{model}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for key in dict.fromkeys((r["task"], r["replacement"], r["circuit"]) for r in mine):
            by = {r["method"]: r for r in mine if (r["task"], r["replacement"], r["circuit"]) == key}
            first = next(iter(by.values()))
            cells = [f"{by[m]['spearman']:+.2f} / {by[m]['recall']:.2f}" if m in by else "" for m in methods]
            out.append("| " + " | ".join([*key, str(first["n_cells"]), *cells, f"{by['atp*']['verify_share']:.2f}",
                                          f"{first['max_abs_effect']:.3g}"]) + " |")
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny cases, seconds")
    parser.add_argument("--only", nargs="*", choices=("bundled", "trained", "random"),
                        default=("bundled", "trained", "random"))
    parser.add_argument("--vocab", type=int, default=1000, help="vocabulary of the random shapes")
    parser.add_argument("--steps", type=int, default=300, help="training steps of the briefly trained model")
    parser.add_argument("--out", help="write every row as JSON here")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--from-json", help="print the Markdown tables of rows saved by --out, and exit")
    args = parser.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            print(markdown(json.load(f)))
        return
    torch.manual_seed(0)
    print(f"torch threads {torch.get_num_threads()}; python {sys.version.split()[0]}")
    cases = []
    if "bundled" in args.only:
        cases += bundled_cases(args.smoke)
    if "trained" in args.only:
        cases += trained_case(args.smoke, args.steps)
    if "random" in args.only:
        cases += random_cases(args.smoke, 50 if args.smoke else args.vocab)
    rows = []
    for case in cases:
        for replacement in REPLACEMENTS:
            rows += evaluate(_resample_pairs(case) if replacement == "resample" else case, replacement, args.progress)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    print(markdown(rows))


if __name__ == "__main__":
    main()
