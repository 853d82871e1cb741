"""Sanity checks of which head reads what (docs/spec.md §0.2, §1.2, §0.6).

- :func:`check_gqa_mapping`: query head h reads KV head g(h) = :meth:`ModelSpec.kv_head`: (a) each head's z is
  its pattern applied to the values of KV head g(h), ``z_h = pattern_h · v_{g(h)}``; (b) adding noise to the
  keys of KV head g (at ``hook_k``) changes the patterns of exactly the query heads with g(h) = g.
- :func:`check_freeze_isolation`: freezing one head per layer (QK and OV, noise replacement, or OV alone where
  the model refuses QK freezes) leaves every other head's pattern and z bit-identical (``torch.equal``),
  including its GQA siblings, and does change the frozen head's z.

The perturbed and frozen forwards restore each layer's clean residual stream (:func:`~tl_circuits.checks.capture.
isolated_run`), so what is compared in layer l is what an edit in layer l does, in every layer at once.
"""

from __future__ import annotations

import math

import einops
import torch
from torch import Tensor

from tl_circuits.checks.capture import Activations, isolated_run
from tl_circuits.checks.measure import Worst, exact_dtype, tolerance
from tl_circuits.checks.result import CheckOutcome
from tl_circuits.defaults import SEED
from tl_circuits.freezing.hooks import freeze_hooks
from tl_circuits.models.spec import ModelSpec
from tl_circuits.models.types import Model

SCORE_SHIFT = 4.0  # about how far key noise moves a score (the patterns of the heads reading it move by O(0.1))


def _z_from_patterns(spec: ModelSpec, clean: Activations) -> Worst:
    """(a): ``z_h = Σ_k pattern[h, q, k] · v[k, g(h)]`` against hook_z, head by head."""
    dtype = exact_dtype(clean.resid_pre[0].device)
    worst = Worst()
    for layer in range(spec.n_layers):
        pattern, v, z = (clean.hooked[(layer, name)].to(dtype) for name in ("pattern", "v", "z"))
        for head in range(spec.n_heads):
            got = einops.einsum(pattern[:, head], v[:, :, spec.kv_head(head)], "b q k, b k e -> b q e")
            worst.add(got, z[:, :, head], f"layer {layer} head {head}")
    return worst


def _noise_keys(kv_head: int, std: float, generator: torch.Generator):
    def hook(k: Tensor, hook: object) -> Tensor:
        k = k.clone()
        noise = std * torch.randn(k[..., kv_head, :].shape, generator=generator, dtype=torch.float32)
        k[..., kv_head, :] += noise.to(k.device, k.dtype)
        return k
    return hook


def key_noise_std(clean: Activations, layer: int) -> float:
    """Noise on keys that moves scores by about :data:`SCORE_SHIFT` whatever the queries' scale: noise of std σ
    on k moves a score q·k/√d by about rms(q)·σ (the rms over the layer's queries that enter the scores)."""
    rms = float(clean.hooked[(layer, "query")].float().square().mean().sqrt())
    return SCORE_SHIFT / max(rms, 1e-6)


def _pattern_changes(spec: ModelSpec, base: Activations, other: Activations) -> Tensor:
    """``[L, H]``: max |other − base| of each head's pattern."""
    out = torch.zeros(spec.n_layers, spec.n_heads)
    for layer in range(spec.n_layers):
        diff = other.hooked[(layer, "pattern")].float() - base.hooked[(layer, "pattern")].float()
        out[layer] = diff.abs().amax(dim=(0, 2, 3)).cpu()
    return out


def check_gqa_mapping(model: Model, spec: ModelSpec, tokens: Tensor, clean: Activations,
                      baseline: Activations, seed: int = SEED) -> CheckOutcome:
    """Check (4): the query → KV head mapping of :meth:`ModelSpec.kv_head` is the model's (module docstring)."""
    tol = tolerance(spec.dtype)
    mapping = [spec.kv_head(head) for head in range(spec.n_heads)]
    z_worst = _z_from_patterns(spec, clean)
    generator = torch.Generator().manual_seed(seed)
    wrong, leak, weakest = [], 0.0, math.inf
    for kv_head in range(spec.n_kv_heads):
        edits = [(spec.key_hook(layer), _noise_keys(kv_head, key_noise_std(clean, layer), generator))
                 for layer in range(spec.n_layers)]
        change = _pattern_changes(spec, baseline, isolated_run(model, spec, tokens, clean, edits))
        readers = torch.tensor([g == kv_head for g in mapping])
        others = change[:, ~readers]
        leak = max(leak, float(others.max()) if others.numel() else 0.0)
        weakest = min(weakest, float(change[:, readers].min()) if bool(readers.any()) else math.inf)
        for layer in range(spec.n_layers):
            moved = [h for h in range(spec.n_heads) if float(change[layer, h]) > tol]
            expected = [h for h in range(spec.n_heads) if bool(readers[h])]
            if moved != expected:
                wrong.append(f"layer {layer}: noise on KV head {kv_head}'s keys changed the patterns of query heads "
                             f"{moved}, tl_circuits maps {expected} to it")
    passed = z_worst.rel_error <= tol and not wrong
    shown = mapping if len(mapping) <= 16 else [*mapping[:8], "...", *mapping[-2:]]
    mapping_text = f"g(h) = [{', '.join(map(str, shown))}]"
    if passed:
        message = (f"{mapping_text}: z_h = pattern_h·v_g(h) in every layer, and key noise on each KV head changes "
                   f"exactly its query heads' patterns (smallest change {weakest:.2g}, largest elsewhere {leak:.2g})")
    else:
        problems = wrong[:3] + ([f"... and {len(wrong) - 3} more"] if len(wrong) > 3 else [])
        if z_worst.rel_error > tol:
            problems.insert(0, f"z_h != pattern_h·v_g(h): worst {z_worst.where} (relative error "
                               f"{z_worst.rel_error:.2g} > {tol:g})")
        message = f"{mapping_text} is not the model's: " + "; ".join(problems)
    return CheckOutcome("gqa_mapping", passed, z_worst.abs_error, z_worst.rel_error, tol, message)


def freeze_choice(spec: ModelSpec) -> tuple[dict[int, list[int]], str]:
    """One head per layer (head ``l mod H`` in layer l) and the circuit: both, or OV where QK freezes are refused."""
    heads = {layer: [layer % spec.n_heads] for layer in range(spec.n_layers)}
    return heads, ("both" if spec.qk_mask_source is not None else "ov")


def check_freeze_isolation(model: Model, spec: ModelSpec, tokens: Tensor, clean: Activations,
                           baseline: Activations, seed: int = SEED) -> CheckOutcome:
    """Check (5): a frozen head changes, every other head's pattern and z stay bit-identical (module docstring)."""
    heads, circuit = freeze_choice(spec)
    hooks = freeze_hooks(model, heads, circuit, "noise", seed=seed)
    frozen = isolated_run(model, spec, tokens, clean, hooks)
    moved, unmoved, leak = [], [], 0.0
    for layer, (head,) in heads.items():
        for name in ("pattern", "z"):
            got, base = frozen.hooked[(layer, name)], baseline.hooked[(layer, name)]
            axis = 1 if name == "pattern" else 2
            for other in range(spec.n_heads):
                if other == head:
                    continue
                a, b = got.select(axis, other), base.select(axis, other)
                if not torch.equal(a, b):
                    moved.append(f"layer {layer} head {other}'s {name}")
                    leak = max(leak, float((a.float() - b.float()).abs().max()))
        if torch.equal(frozen.hooked[(layer, "z")][:, :, head], baseline.hooked[(layer, "z")][:, :, head]):
            unmoved.append(f"layer {layer} head {head}")
    frozen_text = ", ".join(f"L{layer}H{head}" for layer, (head,) in heads.items())
    what = f"freezing {circuit.upper()} of one head per layer ({frozen_text}; noise replacement)"
    if spec.qk_mask_source is None:
        what += " (QK freezes are refused on this model: OV only)"
    passed = not moved and not unmoved
    if passed:
        siblings = " and its GQA siblings" if spec.group_size > 1 else ""
        message = f"{what} changes the frozen head's z and leaves every other head{siblings} bit-identical"
    else:
        problems = []
        if moved:
            problems.append(f"changed other heads: {', '.join(moved[:4])}" + (" ..." if len(moved) > 4 else ""))
        if unmoved:
            problems.append(f"left the frozen head's z as it was: {', '.join(unmoved)}")
        message = f"{what}: " + "; ".join(problems)
    return CheckOutcome("freeze_isolation", passed, leak, math.nan, 0.0, message)
