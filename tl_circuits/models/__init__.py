"""Models: what tl_circuits knows about a HookedTransformer or TransformerBridge.

- :mod:`~tl_circuits.models.spec`: :class:`ModelSpec` (sizes, hook names, parameter names; read with
  :func:`model_spec`) — ask it instead of ``model.cfg``;
- :mod:`~tl_circuits.models.layout`: the per-head Q/K/V/O layout of attention parameters (docs/spec.md §0);
- :mod:`~tl_circuits.models.hooked`: forward passes and hooks, HookedTransformer or bridge;
- :mod:`~tl_circuits.models.bridge` / :mod:`~tl_circuits.models.bridge_spec` /
  :mod:`~tl_circuits.models.architectures` / :mod:`~tl_circuits.models.native`: TransformerBridge support (the
  attention families whose scores tl_circuits knows, read off the bridge's own attention components);
- :mod:`~tl_circuits.models.bridge_forward`: restarting a bridge at a layer (:func:`run_from_layer`);
- :mod:`~tl_circuits.models.model_dir`: saving and loading tl_circuits' own checkpoint directories;
- :mod:`~tl_circuits.models.hf_directory`: loading a local Hugging Face model directory offline, and telling
  the two kinds of directory apart by their ``config.json``.

>>> from tl_circuits.models import BLOCKS, head_kind
>>> [head_kind(block) for block in BLOCKS]
['query', 'kv', 'kv', 'query']
"""

from tl_circuits.models.bridge_forward import BridgeRestart, prepare_restart, restart_problem, run_from_layer
from tl_circuits.models.model_dir import CheckpointError, is_checkpoint, load_checkpoint, save_checkpoint
from tl_circuits.models.hf_directory import HFDirectoryError, LoadedDirectory, directory_kind, load_hf_directory
from tl_circuits.models.hooked import (
    attention_scores,
    check_tokens,
    functional_logits,
    model_logits,
    post_rotary,
    register_factor_hooks,
)
from tl_circuits.models.layout import (
    BLOCKS,
    WEIGHT_LAYOUTS,
    Block,
    HeadKind,
    WeightLayout,
    bias_to_heads,
    head_kind,
    heads_to_bias,
    heads_to_weight,
    weight_to_heads,
)
from tl_circuits.models.native import native_bridge_from_tl
from tl_circuits.models.spec import ModelSpec, model_spec
from tl_circuits.models.types import Model

__all__ = [
    "BLOCKS",
    "Block",
    "BridgeRestart",
    "CheckpointError",
    "HFDirectoryError",
    "HeadKind",
    "LoadedDirectory",
    "Model",
    "ModelSpec",
    "WEIGHT_LAYOUTS",
    "WeightLayout",
    "attention_scores",
    "bias_to_heads",
    "check_tokens",
    "directory_kind",
    "functional_logits",
    "head_kind",
    "heads_to_bias",
    "heads_to_weight",
    "is_checkpoint",
    "load_checkpoint",
    "load_hf_directory",
    "model_logits",
    "model_spec",
    "native_bridge_from_tl",
    "post_rotary",
    "prepare_restart",
    "register_factor_hooks",
    "restart_problem",
    "run_from_layer",
    "save_checkpoint",
    "weight_to_heads",
]
