"""``sanity_check(model)``: does tl_circuits read this model the way the model computes? (docs/spec.md §0.6)

Six checks on a few random tokens, each against the model's own activations or gradients:

======================  =====================================================================================
``qkv_slicing``         tl_circuits' per-head Q/K/V weight (and bias) slices reproduce ``hook_q``/``hook_k``/
                        ``hook_v`` head by head, for fused and split projections alike
``o_columns``           ``Σ_h z_h · W_O[h] + b_O`` over its O slices reproduces the attention output
``head_additivity``     per-head interference scores summed over heads equal the score over the whole layer tensor
``gqa_mapping``         query head h reads KV head g(h): ``z_h = pattern_h · v_g(h)``, and key noise on KV head g
                        changes exactly the patterns of its query heads
``freeze_isolation``    freezing one head leaves every other head's pattern and z bit-identical
``model_unchanged``     parameters, buffers, hooks and train/eval mode are as before, and so are the outputs
======================  =====================================================================================

A model tl_circuits refuses (``NotImplementedError`` from :func:`tl_circuits.model_spec`, docs/spec.md §0.5) gets a
result whose ``refusal`` is the reason, and no checks. A check that fails, or raises, is a failed
:class:`~tl_circuits.checks.result.CheckOutcome` naming the problem; ``sanity_check`` itself raises only for
arguments that are not a model or tokens.

>>> from tl_circuits import load_bundled_model
>>> result = sanity_check(load_bundled_model("induction-2l"))
>>> result.passed, [check.name for check in result.checks]
(True, ['qkv_slicing', 'o_columns', 'head_additivity', 'gqa_mapping', 'freeze_isolation', 'model_unchanged'])
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from jaxtyping import Int
from torch import Tensor

from tl_circuits.checks.additivity import check_head_additivity
from tl_circuits.checks.capture import attention_bias_out, capture_clean, isolated_run
from tl_circuits.checks.heads import check_freeze_isolation, check_gqa_mapping
from tl_circuits.checks.result import CheckOutcome, SanityCheckResult
from tl_circuits.checks.slicing import check_o_columns, check_qkv_slicing
from tl_circuits.checks.state import model_state, state_differences
from tl_circuits.defaults import SEED
from tl_circuits.models.spec import ModelSpec, check_tokens, model_spec
from tl_circuits.models.types import Model

__all__ = ["CHECKS", "sanity_check"]

CHECKS = ("qkv_slicing", "o_columns", "head_additivity", "gqa_mapping", "freeze_isolation", "model_unchanged")


def random_tokens(spec: ModelSpec, n_samples: int, n_positions: int, seed: int, device: torch.device) -> Tensor:
    """``[n_samples, min(n_positions, n_ctx)]`` uniform token ids from a seeded generator (no global RNG)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, spec.d_vocab, (n_samples, min(n_positions, spec.n_ctx)), generator=generator).to(device)


def _attempt(name: str, check: Callable[[], CheckOutcome]) -> CheckOutcome:
    try:
        return check()
    except Exception as error:  # noqa: BLE001 - a check that cannot run is a failed check, reported with its error
        return CheckOutcome.raised(name, error)


def _model_unchanged(changes: list[str]) -> CheckOutcome:
    message = ("parameters, buffers, hooks, train/eval mode and outputs are as before" if not changes else
               "the checks changed the model: " + "; ".join(changes[:5]) + (" ..." if len(changes) > 5 else ""))
    return CheckOutcome("model_unchanged", not changes, math.nan, math.nan, 0.0, message)  # it lists, not measures


def sanity_check(
    model: Model,
    tokens: Optional[Int[Tensor, "batch pos"]] = None,
    *,
    n_samples: int = 4,
    n_positions: int = 8,
    seed: int = SEED,
) -> SanityCheckResult:
    """Run the six checks of the module docstring on ``model``; never changes it, never raises on a failed check.

    Args:
        model: a HookedTransformer or TransformerBridge.
        tokens: ``[batch, pos]`` token ids to run on (at least 2 samples of at least 2 positions); ``None``:
            ``n_samples`` × ``n_positions`` (at most ``n_ctx``) uniform random ids drawn with ``seed``.
        seed: seed of the random tokens and of the noise the GQA and freeze checks add.
    Returns:
        :class:`~tl_circuits.checks.result.SanityCheckResult`: ``passed``, one outcome per check (pass/fail,
        measured error, tolerance, message), or the refusal's reason for a model tl_circuits does not support.
    Raises:
        TypeError: ``model`` is not a HookedTransformer or TransformerBridge, or ``tokens`` not integer ids.
        ValueError: ``tokens`` of the wrong shape or outside the vocabulary, or fewer than 2 samples/positions.
    """
    kind = type(model).__name__
    try:
        spec = model_spec(model)
    except NotImplementedError as refusal:
        return SanityCheckResult(kind, kind, refusal=" ".join(str(refusal).split()))
    device = next(model.parameters()).device
    if tokens is None:
        if n_samples < 2 or n_positions < 2:
            raise ValueError(f"sanity_check needs at least 2 samples of 2 positions, got n_samples={n_samples}, "
                             f"n_positions={n_positions}")
        tokens = random_tokens(spec, n_samples, n_positions, seed, device)
    check_tokens(spec, tokens)
    if tokens.shape[0] < 2 or tokens.shape[1] < 2:
        raise ValueError(f"sanity_check needs tokens of at least 2 samples and 2 positions, got {tuple(tokens.shape)}")
    tokens = tokens.to(device)
    settings = dict(n_samples=tokens.shape[0], n_positions=tokens.shape[1], seed=seed, dtype=str(spec.dtype),
                    n_layers=spec.n_layers, n_heads=spec.n_heads, n_kv_heads=spec.n_kv_heads)
    before = model_state(model, tokens)
    outcomes = _run_checks(model, spec, tokens, seed)
    outcomes.append(_model_unchanged(state_differences(before, model_state(model, tokens))))
    return SanityCheckResult(spec.architecture, kind, tuple(outcomes), settings=settings)


def _run_checks(model: Model, spec: ModelSpec, tokens: Tensor, seed: int) -> list[CheckOutcome]:
    """The first five checks; where the forwards they read cannot run, those that read them fail with its error."""
    failure: Optional[Exception] = None
    try:
        clean = capture_clean(model, spec, tokens)
        bias_out = attention_bias_out(model, spec, tokens)
        baseline = isolated_run(model, spec, tokens, clean)
    except Exception as error:  # noqa: BLE001 - reported as the failure of every check that reads these forwards
        failure = error

    def reading(name: str, check: Callable[[], CheckOutcome]) -> CheckOutcome:
        return CheckOutcome.raised(name, failure) if failure is not None else _attempt(name, check)

    return [
        reading("qkv_slicing", lambda: check_qkv_slicing(model, spec, clean)),
        reading("o_columns", lambda: check_o_columns(model, spec, clean, bias_out)),
        _attempt("head_additivity", lambda: check_head_additivity(model, spec, tokens)),
        reading("gqa_mapping", lambda: check_gqa_mapping(model, spec, tokens, clean, baseline, seed)),
        reading("freeze_isolation", lambda: check_freeze_isolation(model, spec, tokens, clean, baseline, seed)),
    ]
