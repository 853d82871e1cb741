"""The ``Model`` type of every public signature: a HookedTransformer or a TransformerBridge.

Both are optional imports (TransformerLens 4.x has no HookedTransformer; 2.x has no bridge), so the alias
is spelled for type checkers and falls back to ``torch.nn.Module`` at run time.

>>> from tl_circuits import load_bundled_model
>>> model = load_bundled_model("induction-2l")  # a HookedTransformer on TransformerLens < 4, a bridge on 4.x
>>> isinstance(model, Model)  # at run time, any torch module
True
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Union

from torch import nn

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from transformer_lens import HookedTransformer
    from transformer_lens.model_bridge import TransformerBridge

    Model = Union[HookedTransformer, TransformerBridge]
else:
    Model = nn.Module

__all__ = ["Model"]
