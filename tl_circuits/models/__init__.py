"""Models: what tl_circuits knows about a HookedTransformer or TransformerBridge (spec and per-head layout),
the bridge and native-bridge support, and checkpoints."""

from tl_circuits.models.types import Model

__all__ = ["Model"]
