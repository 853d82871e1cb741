"""The ``Model`` type of every public signature: a HookedTransformer or a TransformerBridge.

Both are optional imports (TransformerLens 4.x has no HookedTransformer; 2.x has no bridge), so the alias
is spelled for type checkers and falls back to ``torch.nn.Module`` at run time.

>>> from transformer_lens import HookedTransformer, HookedTransformerConfig
>>> model = HookedTransformer(HookedTransformerConfig(n_layers=1, d_model=16, n_heads=2, d_head=8, n_ctx=8,
...                                                  d_vocab=20, act_fn="gelu"))
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
