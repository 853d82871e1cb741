"""Testing with tl_circuits: tiny models of every supported architecture, and assertions for circuit claims.

- **Builders** (:mod:`~tl_circuits.testing.builders`, :mod:`~tl_circuits.testing.architectures`): a tiny
  random-weight model of any architecture in :data:`TINY_ARCHITECTURES` (GQA, multi-query, fused QKV, rotary,
  ALiBi, soft-capping ...) as a ``TransformerBridge`` or, on TransformerLens < 4, a ``HookedTransformer``
  (:func:`tiny_model`); the Hugging Face model itself (:func:`tiny_hf_model`); a local HF folder with a tokenizer
  (:func:`tiny_hf_dir`). Deterministic in a seed, no hub.
- **Assertions** with failure messages that say what was measured: :func:`assert_freeze_effect` (a freeze moves a
  metric by at least / at most an amount, by a paired test over samples), :func:`assert_conflict` /
  :func:`assert_no_conflict` (the conflict test over chosen heads, on :func:`conflict_scores`), and the context
  manager :func:`assert_model_unchanged` (parameters, buffers, hooks, modes).
- **A pytest plugin** (module ``pytest_tl_circuits``, registered through the ``pytest11`` entry point: installing
  tl_circuits is enough): fixtures ``tlc_bundled_model``, ``tlc_tiny_model`` over ``tlc_architecture``,
  ``tlc_task_batch`` and more; see docs/testing.md.

>>> from tl_circuits.testing import assert_model_unchanged, tiny_model, tiny_tokens
>>> model = tiny_model("BloomForCausalLM", seed=1)         # ALiBi, fused per-head query_key_value
>>> with assert_model_unchanged(model):
...     logits = model(tiny_tokens())
"""

from tl_circuits.testing.architectures import (
    FEATURES,
    REPRESENTATIVE_ARCHITECTURES,
    TINY_ARCHITECTURES,
    TINY_D_HEAD,
    TINY_D_MODEL,
    TINY_D_VOCAB,
    TINY_N_CTX,
    TINY_N_HEADS,
    TINY_N_LAYERS,
    TinyArchitecture,
    architecture_names,
    has_hooked_transformer,
    hf_unsupported_reason,
    select_architectures,
    unsupported_reason,
)
from tl_circuits.testing.builders import bridge_of, tiny_hf_dir, tiny_hf_model, tiny_model, tiny_tokens, widen
from tl_circuits.testing.conflict_assertions import (
    ConflictScores,
    assert_conflict,
    assert_no_conflict,
    conflict_scores,
)
from tl_circuits.testing.freeze_assertions import FreezeEffect, assert_freeze_effect, freeze_effect_per_sample
from tl_circuits.testing.state import ModelState, assert_model_unchanged, model_state, state_differences

__all__ = [
    "FEATURES",
    "REPRESENTATIVE_ARCHITECTURES",
    "TINY_ARCHITECTURES",
    "TINY_D_HEAD",
    "TINY_D_MODEL",
    "TINY_D_VOCAB",
    "TINY_N_CTX",
    "TINY_N_HEADS",
    "TINY_N_LAYERS",
    "ConflictScores",
    "FreezeEffect",
    "ModelState",
    "TinyArchitecture",
    "architecture_names",
    "assert_conflict",
    "assert_freeze_effect",
    "assert_model_unchanged",
    "assert_no_conflict",
    "bridge_of",
    "conflict_scores",
    "freeze_effect_per_sample",
    "has_hooked_transformer",
    "hf_unsupported_reason",
    "model_state",
    "select_architectures",
    "state_differences",
    "tiny_hf_dir",
    "tiny_hf_model",
    "tiny_model",
    "tiny_tokens",
    "unsupported_reason",
    "widen",
]
