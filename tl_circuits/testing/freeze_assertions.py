"""``assert_freeze_effect``: a claim that freezing some heads' circuit moves a metric by at least, or at most, an
amount, judged over samples by the freeze sweep's paired test and interval (docs/spec.md §1.8) — not by one number.

>>> import tl_circuits as tlc
>>> model = tlc.load_bundled_model("induction-2l")
>>> batch = tlc.bundled_tasks("induction-2l")["induction"](16, seed=0)
>>> effect = assert_freeze_effect(model, [(1, 0), (1, 1), (1, 2), (1, 3)], batch, circuit="qk", at_least=1.0)
>>> effect.passed, effect.n_samples
(True, 16)
>>> assert_freeze_effect(model, [(0, 1)], batch, at_least=1.0)     # doctest: +ELLIPSIS
Traceback (most recent call last):
...
AssertionError: freeze effect claim failed: freezing the QK circuit (zero) of L0H1 changes in_context_loss by ...
  measured over 16 samples: mean effect +0.1011, 95% bca interval [+0.07285, +0.1333]
  bound at least +1: H0 "mean effect <= +1" not rejected, one-sided sign-flip p = 1 (exact, 65536 sign patterns)
  the claim needs p <= 0.05 for every bound
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor

from tl_circuits import defaults
from tl_circuits.bundled.scoring import scored_loss
from tl_circuits.bundled.tasks import TaskBatch
from tl_circuits.freezing.api import freeze
from tl_circuits.freezing.options import Circuit, Replacement, normalize_heads
from tl_circuits.freezing.stacked import evaluate_metric
from tl_circuits.models.spec import model_spec
from tl_circuits.stats.paired import paired_bootstrap_ci, sign_flip_test
from tl_circuits.stats.pvalues import p_value_floor
from tl_circuits.stats.validation import check_open_unit

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from tl_circuits.freezing.options import HeadsLike
    from tl_circuits.models.types import Model

__all__ = ["FreezeEffect", "assert_freeze_effect", "freeze_effect_per_sample"]

Batch = Union[Int[Tensor, "batch pos"], TaskBatch]
PerSampleMetric = Callable[[Float[Tensor, "batch pos d_vocab"]], Float[Tensor, " batch"]]


@dataclass(frozen=True)
class FreezeEffect:
    """What :func:`assert_freeze_effect` measured and decided.

    ``per_sample_effect`` [N]: each sample's frozen minus clean metric (float64; NaN = missing);
    ``mean_effect``: their finite mean; ``ci_low`` / ``ci_high``: its bootstrap interval; ``p_at_least`` /
    ``p_at_most``: the one-sided sign-flip p-value of each bound given (None without that bound);
    ``passed``: every given bound's p ≤ ``alpha``.
    """

    heads: tuple[tuple[int, int], ...]
    circuit: str
    replacement: str
    metric_name: str
    at_least: Optional[float]
    at_most: Optional[float]
    per_sample_effect: Float[Tensor, " n"]
    mean_effect: float
    ci_low: float
    ci_high: float
    ci_method: str
    confidence_level: float
    p_at_least: Optional[float]
    p_at_most: Optional[float]
    n_samples: int
    n_permutations: int
    exact: bool
    alpha: float
    passed: bool

    def claim(self) -> str:
        """The claim in words, e.g. ``freezing the QK circuit (zero) of L1H0, L1H1 changes loss by at least +1``."""
        heads = ", ".join(f"L{layer}H{head}" for layer, head in self.heads)
        if self.at_least is not None and self.at_most is not None:
            amount = f"between {self.at_least:+g} and {self.at_most:+g}"
        else:
            amount = f"at least {self.at_least:+g}" if self.at_least is not None else f"at most {self.at_most:+g}"
        return (f"freezing the {self.circuit.upper()} circuit ({self.replacement}) of {heads} changes "
                f"{self.metric_name} by {amount}")

    def report(self) -> str:
        """The claim, what was measured, and each bound's test: the text of the assertion's failure."""
        lines = [f"{'freeze effect claim' if self.passed else 'freeze effect claim failed'}: {self.claim()}",
                 f"  measured over {self.n_samples} samples: mean effect {self.mean_effect:+.4g}, "
                 f"{self.confidence_level:.0%} {self.ci_method} interval [{self.ci_low:+.4g}, {self.ci_high:+.4g}]"]
        patterns = f"{'exact' if self.exact else 'Monte Carlo'}, {self.n_permutations} sign patterns"
        for name, bound, p, sign in (("at least", self.at_least, self.p_at_least, "<="),
                                     ("at most", self.at_most, self.p_at_most, ">=")):
            if bound is None or p is None:
                continue
            verdict = "rejected" if p <= self.alpha else "not rejected"
            lines.append(f"  bound {name} {bound:+g}: H0 \"mean effect {sign} {bound:+g}\" {verdict}, one-sided "
                         f"sign-flip p = {p:.3g} ({patterns})")
        lines.append(f"  the claim needs p <= {self.alpha:g} for every bound")
        return "\n".join(lines)


def _tokens_and_metric(data: Batch, metric: Optional[PerSampleMetric]) -> tuple[Tensor, PerSampleMetric, str]:
    """The tokens, the per-sample metric and its name: by default each sample's mean next-token loss over a
    TaskBatch's scored positions, or over every position of plain tokens (the sweep's default)."""
    if isinstance(data, TaskBatch):
        batch = data
        default_name = "in_context_loss"
    elif isinstance(data, Tensor) and data.ndim == 2 and not data.is_floating_point():
        scored = torch.ones(data.shape, dtype=torch.bool)
        scored[:, -1] = False  # the last position predicts nothing
        batch = TaskBatch(data, scored, "tokens")
        default_name = "loss"
    else:
        raise TypeError(f"data must be a TaskBatch or integer tokens [batch, pos], got {type(data).__name__}"
                        + (f" of shape {tuple(data.shape)} and dtype {data.dtype}" if isinstance(data, Tensor) else ""))
    if metric is not None:
        return batch.tokens, metric, getattr(metric, "__name__", "metric")

    def per_sample_loss(logits: Tensor) -> Tensor:
        return scored_loss(logits, batch, per_sample=True)

    return batch.tokens, per_sample_loss, default_name


def freeze_effect_per_sample(model: Model, heads: HeadsLike, data: Batch, metric: Optional[PerSampleMetric] = None,
                             *, circuit: Union[str, Circuit] = "qk", replacement: Union[str, Replacement] = "zero",
                             **freeze_kwargs: Any) -> tuple[Float[Tensor, " n"], str]:
    """Each sample's metric with ``heads``' ``circuit`` frozen (all together, :func:`tl_circuits.freeze`) minus
    without: ``([N] float64, metric name)``. ``metric``: ``logits -> [batch]`` (NaN = missing); default as
    :func:`assert_freeze_effect`. The freeze's hooks are removed on every exit path."""
    tokens, metric_fn, name = _tokens_and_metric(data, metric)
    tokens = tokens.to(next(model.parameters()).device)
    with torch.no_grad():
        clean = evaluate_metric(metric_fn, model(tokens), per_sample=True)
        with freeze(model, heads, circuit, replacement, **freeze_kwargs):
            frozen = evaluate_metric(metric_fn, model(tokens), per_sample=True)
    return frozen - clean, name


def assert_freeze_effect(
    model: Model,
    heads: HeadsLike,
    data: Batch,
    metric: Optional[PerSampleMetric] = None,
    *,
    at_least: Optional[float] = None,
    at_most: Optional[float] = None,
    circuit: Union[str, Circuit] = "qk",
    replacement: Union[str, Replacement] = "zero",
    alpha: float = defaults.ALPHA,
    n_permutations: Optional[int] = None,
    n_bootstrap: int = defaults.N_BOOTSTRAP,
    confidence_level: float = defaults.CONFIDENCE_LEVEL,
    ci_method: str = "bca",
    seed: Optional[int] = defaults.SEED,
    **freeze_kwargs: Any,
) -> FreezeEffect:
    """Assert that freezing ``heads``' ``circuit`` (together) changes ``metric`` by at least ``at_least`` and/or at
    most ``at_most``, per sample, frozen minus clean; return the :class:`FreezeEffect` (raise ``AssertionError``
    with its :meth:`~FreezeEffect.report` when the data do not support the claim).

    Signs are the metric's: with a loss, ``at_least=1.0`` claims the freeze raises it by at least 1; "changes it
    by at most 0.1 either way" is ``at_least=-0.1, at_most=0.1``.

    **What is tested.** Each sample's effect ``e_i`` (frozen minus clean metric on sample i, the freeze sweep's
    per-sample effect) is one paired difference. A bound ``at_least=a`` is the one-sided paired sign-flip test
    (:func:`tl_circuits.stats.paired.sign_flip_test`, the sweep's test) of H0 "``e_i - a`` is symmetric about 0,
    independently over samples" (so the mean effect is at most ``a``) against a mean above ``a``;
    ``at_most=b`` likewise against a mean below ``b``. The claim passes when every given bound's H0 is rejected at
    ``alpha`` (with both bounds this is the two one-sided tests procedure; no correction is needed, both must
    reject). The interval (:func:`~tl_circuits.stats.paired.paired_bootstrap_ci`) is reported, not used to decide.

    **Error rates**, over draws of the samples (a seeded test is deterministic: it passes or fails every run):
    when the claim is false (the mean effect is on the wrong side of a bound) the assertion passes with
    probability at most ``alpha``; when it is true it fails with probability 1 − power, which is not bounded:
    it nears 1 − ``alpha`` as the mean effect nears a bound and falls fast with distance, roughly
    ``Φ(z_{1-α} − d√N/σ)`` for a distance ``d``, per-sample spread ``σ`` and ``N`` samples. Put bounds well inside
    what you expect, and use enough samples: with ``N`` samples the exact test's smallest p is ``2^-N``, so fewer
    than 5 samples can never pass at ``alpha=0.05`` (a ``ValueError`` says so).

    Args:
        heads: (layer, head) pairs or any form :func:`tl_circuits.normalize_heads` takes; frozen together.
        data: a :class:`~tl_circuits.TaskBatch`, or integer tokens [batch, pos].
        metric: ``logits -> [batch]``, one value per sample (NaN = missing); default each sample's mean
            next-token loss over the batch's scored positions (every position for plain tokens).
        circuit, replacement, freeze_kwargs: as :func:`tl_circuits.freeze` (``reference``, ``noise_scale``, ...;
            a NOISE freeze is seeded with ``seed``).
        alpha: the level of each bound's test; n_permutations: random sign patterns when the test is not exact
            (default as the sweep; exact enumeration up to 16 samples).
        n_bootstrap, confidence_level, ci_method, seed: the reported interval (``seed`` also seeds the random sign
            patterns, when the test is not exact, and a NOISE freeze).
    """
    if at_least is None and at_most is None:
        raise ValueError("say what you claim: give at_least and/or at_most (the effect is frozen minus clean)")
    if at_least is not None and at_most is not None and at_least > at_most:
        raise ValueError(f"at_least={at_least} is above at_most={at_most}: no effect satisfies both")
    alpha = check_open_unit("alpha", alpha)
    effect, metric_name = freeze_effect_per_sample(model, heads, data, metric, circuit=circuit,
                                                   replacement=replacement, seed=seed, **freeze_kwargs)
    n_samples = int(torch.isfinite(effect).sum())
    if n_samples == 0:
        raise ValueError("every sample's metric is NaN (clean or frozen): nothing to test")
    tests = {}
    for name, bound, alternative in (("at_least", at_least, "greater"), ("at_most", at_most, "less")):
        if bound is not None:
            test = sign_flip_test((effect - bound)[:, None], alternative=alternative, n_permutations=n_permutations,
                                  seed=seed)
            floor = p_value_floor(test.n_permutations, alternative, exact=test.exact)
            if floor > alpha:
                raise ValueError(f"with {n_samples} samples the sign-flip test's smallest p-value is {floor:.3g}, "
                                 f"above alpha={alpha}: this assertion could never pass; use more samples")
            tests[name] = test
    low = high = math.nan
    if n_bootstrap and n_samples >= 2:
        ci = paired_bootstrap_ci(effect[:, None], n_resamples=n_bootstrap, confidence_level=confidence_level,
                                 method=ci_method, seed=seed)
        low, high = float(ci.low[0]), float(ci.high[0])
    p = {name: float(test.p_value[0]) for name, test in tests.items()}
    first = next(iter(tests.values()))
    result = FreezeEffect(
        heads=normalize_heads(model_spec(model), heads), circuit=str(getattr(circuit, "value", circuit)),
        replacement=str(getattr(replacement, "value", replacement)), metric_name=metric_name, at_least=at_least,
        at_most=at_most, per_sample_effect=effect, mean_effect=float(effect.nanmean()), ci_low=low, ci_high=high,
        ci_method=ci_method, confidence_level=confidence_level, p_at_least=p.get("at_least"),
        p_at_most=p.get("at_most"), n_samples=n_samples, n_permutations=first.n_permutations, exact=first.exact,
        alpha=alpha, passed=all(v <= alpha for v in p.values()))
    if not result.passed:
        raise AssertionError(result.report())
    return result
