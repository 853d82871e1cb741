"""Checks of a padded sweep's inputs (docs/spec.md §1.7): RESAMPLE references paired with the clean samples, and
QK freezes that cannot see the padding.

A RESAMPLE freeze patches position ``p`` of clean sample ``i`` with position ``p`` of its reference row ``i``. With
padding that is only the corrupted version of the same sample when both rows hold their tokens at the same
positions: same number of valid tokens, same padding side.

>>> import torch
>>> clean = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
>>> corrupted = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
>>> check_resample_masks(torch.zeros(2, 4, dtype=torch.long), clean, [torch.zeros(2, 4, dtype=torch.long)],
...                      corrupted, Replacement.RESAMPLE)  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
ValueError: samples [1]: a clean sample and its RESAMPLE reference row differ in length (sample 1: 4 valid ...
"""

from __future__ import annotations

from typing import Optional, Sequence

from jaxtyping import Int
from torch import Tensor

from tl_circuits.freezing.options import Circuit, Replacement
from tl_circuits.interference.inputs import check_mask
from tl_circuits.models.spec import ModelSpec


def check_resample_masks(tokens: Tensor, mask: Optional[Tensor], references: Sequence[object],
                         reference_mask: Optional[Tensor], replacement: Replacement,
                         ) -> Optional[Int[Tensor, "batch pos"]]:
    """The attention mask to run RESAMPLE reference tokens with (``None``: unpadded), checked against the clean
    ``mask``: per-sample reference batches of the clean shape, each sample's valid positions the same in both."""
    token_refs = [r for r in references if isinstance(r, Tensor)]
    if reference_mask is not None and (replacement != Replacement.RESAMPLE or len(token_refs) != len(references)):
        raise ValueError("reference_attention_mask is the padding of RESAMPLE reference tokens; this sweep has none")
    if replacement != Replacement.RESAMPLE or (mask is None and reference_mask is None) or not token_refs:
        return None
    clean = check_mask(tokens, mask, "tokens")
    for ref in token_refs:
        if tuple(ref.shape) != tuple(tokens.shape):
            raise ValueError(f"RESAMPLE reference tokens of shape {tuple(ref.shape)} with padding: a padded sweep "
                             f"patches sample i from reference row i, so the reference must be a per-sample "
                             f"corrupted batch of the clean shape {tuple(tokens.shape)}")
    checked = check_mask(token_refs[0], clean if reference_mask is None else reference_mask, "reference tokens")
    n_clean, n_ref = clean.sum(1), checked.to(clean.device).sum(1)
    longer = (n_clean != n_ref).nonzero().flatten().tolist()
    if longer:
        i = longer[0]
        raise ValueError(f"samples {longer}: a clean sample and its RESAMPLE reference row differ in length (sample "
                         f"{i}: {int(n_clean[i])} valid tokens, its reference row {int(n_ref[i])}); a freeze patches "
                         "position by position, so a corrupted prompt must tokenise to as many tokens as the clean one")
    moved = (clean != checked.to(clean.device)).any(1).nonzero().flatten().tolist()
    if moved:
        raise ValueError(f"samples {moved}: a clean sample and its RESAMPLE reference row are padded differently "
                         "(their valid tokens sit at other positions); pad both on the same side")
    return checked


def check_padded_qk(spec: ModelSpec, mask: Optional[Tensor], circuits: Sequence[Circuit],
                    replacement: Replacement) -> None:
    """Refuse a padded QK-ZERO/MEAN/NOISE sweep where the frozen pattern cannot see the padding: a delegating
    bridge (GPT-J, OPT; ``spec.qk_mask_source == "causal"``, docs/spec.md §0.4) would attend to padded keys."""
    padded = mask is not None and bool((mask == 0).any())
    qk = any(c in (Circuit.QK, Circuit.BOTH) for c in circuits)
    if padded and qk and spec.qk_mask_source == "causal" and replacement in (
            Replacement.ZERO, Replacement.MEAN, Replacement.NOISE):
        raise ValueError(f"a padded QK-{replacement.value.upper()} sweep is not exact on this bridge: its attention "
                         "is computed by Hugging Face and the padding mask is not visible to the freeze (docs/spec.md "
                         "§0.4); sweep samples of equal length without padding, or use RESAMPLE or IDENTITY")


__all__ = ["check_padded_qk", "check_resample_masks"]
