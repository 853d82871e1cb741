"""Sanity check (3): head additivity of the interference scores (docs/spec.md §3.3, §0.6).

tl_circuits' per-head signed scores ``S_ij[B, l, h] = Σ_{p ∈ slice(B, l, h)} g_i[p] g_j[p] / F̃[p]``, summed over
the heads of a block, must equal the same sum taken over the whole, unsliced parameter tensors of that block and
layer. The per-head side is the library's whole pipeline (:func:`~tl_circuits.compute_interference`: the
factored gradients streamed through the engine, the pooled Fisher, the per-block contractions), on the first half
of the samples as task A and the rest as task B; the whole-layer side shares none of it: one ``torch.autograd.grad`` of
TransformerLens's own loss per sample, with respect to the named parameters themselves, and the Fisher as the mean
of their squares, in float64. The slices must therefore cover each parameter exactly once (no KV head counted per
query head, no bias left out) and the factored gradients must be the model's.

The damping is one absolute λ for every parameter (``damping_abs``, with ``damping_rel = 0``): the relative damping
is per slice, and a whole-layer sum must not depend on how the layer is sliced. λ is :data:`DAMPING_SCALE` times
the mean Fisher over all attention parameters, so that a parameter whose gradient is rounding noise (a key bias:
softmax ignores a score shift shared by all keys) cannot dominate the sums.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tl_circuits.checks.measure import Worst, exact_dtype, measured_outcome, tolerance
from tl_circuits.checks.result import CheckOutcome
from tl_circuits.checks.slicing import has_bias
from tl_circuits.interference.config import GradientConfig, InterferenceConfig
from tl_circuits.interference.engine import compute_interference
from tl_circuits.models.spec import BLOCKS, Block, ModelSpec
from tl_circuits.models.types import Model

DAMPING_SCALE = 1e-3  # λ relative to the mean Fisher of the attention parameters (the library's damping_rel)


def block_parameter_names(spec: ModelSpec, layer: int, block: Block, include_biases: bool) -> list[str]:
    """The whole parameters of one block and layer: its weight, and its bias when biases are included."""
    names = [spec.param_name(layer, block)]
    if include_biases and block != "O":
        names.append(spec.param_name(layer, block, bias=True))
    return names


def plain_gradients(model: Model, tokens: Tensor, names: list[str]) -> dict[str, Tensor]:
    """``{name: [N, *param.shape]}``: each sample's gradient of the model's own loss (``return_type="loss"``),
    one ``torch.autograd.grad`` per sample. ``requires_grad`` is switched on where it was off, and back after;
    ``.grad`` is never touched."""
    params = dict(model.named_parameters())
    targets = [params[name] for name in names]
    switched = [p for p in targets if not p.requires_grad]
    out: dict[str, list[Tensor]] = {name: [] for name in names}
    try:
        for p in switched:
            p.requires_grad_(True)
        with torch.enable_grad():
            for i in range(tokens.shape[0]):
                loss = model(tokens[i:i + 1], return_type="loss")
                for name, g in zip(names, torch.autograd.grad(loss, targets, allow_unused=True)):
                    out[name].append(torch.zeros_like(params[name]) if g is None else g.detach())
    finally:
        for p in switched:
            p.requires_grad_(False)
    return {name: torch.stack(gs) for name, gs in out.items()}


def check_head_additivity(model: Model, spec: ModelSpec, tokens: Tensor) -> CheckOutcome:
    """Check (3): Σ_h of each block's per-head scores equals the score over the whole layer tensor (module docs)."""
    include_biases = all(has_bias(spec, block) for block in ("Q", "K", "V"))
    names = [name for layer in range(spec.n_layers) for block in BLOCKS
             for name in block_parameter_names(spec, layer, block, include_biases)]
    dtype = exact_dtype(tokens.device)
    raw = plain_gradients(model, tokens, names)  # in the model's dtype: n_samples copies of the parameters
    n_a = tokens.shape[0] // 2
    fisher = {name: raw[name].flatten(1).to(dtype).square().mean(0) for name in names}  # pooled over A ∪ B
    damping = DAMPING_SCALE * float(sum(f.sum() for f in fisher.values())) / sum(f.numel() for f in fisher.values())
    config = InterferenceConfig(GradientConfig(include_biases=include_biases, progress=False), variant="signed",
                                reduction="sum", fisher_source="pooled", damping_abs=damping, damping_rel=0.0)
    per_head = compute_interference(model, tokens[:n_a], tokens[n_a:], config=config).scores
    worst = Worst()
    for block in BLOCKS:
        summed = per_head[block].sum(-1).to(dtype)  # [N_A, N_B, L]
        for layer in range(spec.n_layers):
            whole = torch.zeros(summed.shape[:2], dtype=dtype, device=summed.device)
            magnitude = torch.zeros_like(whole)  # Σ_p |g_i g_j| / F̃: the scale of the sum's rounding
            for name in block_parameter_names(spec, layer, block, include_biases):
                g = raw[name].flatten(1).to(dtype)  # [N, numel]
                left = g[:n_a] / (fisher[name] + damping)
                whole += (left @ g[n_a:].T).to(whole.device)
                magnitude += (left.abs() @ g[n_a:].abs().T).to(whole.device)
            worst.add(summed[..., layer], whole, f"layer {layer} {block}", scale=magnitude)
    tol = tolerance(spec.dtype)
    what = (f"per-head signed scores summed over heads ({n_a}×{tokens.shape[0] - n_a} sample pairs, pooled Fisher, "
            f"biases {'included' if include_biases else 'not included'})")
    return measured_outcome("head_additivity", worst, tol, f"{what} equal the score over the whole unsliced layer "
                            "tensors", f"{what} differ from the score over the whole layer tensor (the per-head "
                            "slices miss or repeat parameters, or the gradients are not the model's)")
