"""Freeze each head in turn, per circuit, and measure the effect on a metric.

Freezing a head in layer l cannot change anything before layer l, so the sweep runs the clean model
once, caches every ``resid_pre``, and for layer l restarts from the cached ``resid_pre_l``
(``start_at_layer=l``) instead of re-running the whole model. A ``TransformerBridge`` cannot restart at a
layer; there each variant runs the whole model (same numbers, more work). The (circuit, head) variants of one
layer are stacked along the batch — copy c freezes one head in its own rows only — so a layer is
one forward pass (or a few, within ``max_batch_rows``).

>>> import torch
>>> from transformer_lens import HookedTransformer, HookedTransformerConfig
>>> model = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=16, n_heads=2, d_head=8,
...                                                  n_ctx=8, d_vocab=20, act_fn="gelu"))
>>> result = freeze_sweep(model, torch.randint(0, 20, (2, 6)), progress=False)
>>> result.effect["qk"].shape, result.effect["ov"].shape
(torch.Size([2, 2]), torch.Size([2, 2]))
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence, Union

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

try:  # TransformerLens >= 3 (and 4.x, which has no transformer_lens.utils)
    from transformer_lens.utilities.lm_utils import lm_cross_entropy_loss
except ImportError:  # TransformerLens 2.x
    from transformer_lens.utils import lm_cross_entropy_loss

from tl_circuits.defaults import GB, SEED
from tl_circuits.freezing.hooks import Hook, LayerFreeze, freeze_generator
from tl_circuits.freezing.options import (
    NOISE_SCALE,
    Circuit,
    FreezeSpec,
    GradientMode,
    Replacement,
    check_noise_scale,
    check_qk_freezable,
    check_replacement_fits,
    parse_option,
)
from tl_circuits.freezing.references import ReferenceLike, prepare_reference
from tl_circuits.models.spec import check_tokens, model_spec
from tl_circuits.models.types import Model
from tl_circuits.parallel.sweep import SweepShare

if TYPE_CHECKING:  # pragma: no cover - for type checkers only
    from matplotlib.figure import Figure
    from pandas import DataFrame

Metric = Callable[[Float[Tensor, "batch pos d_vocab"]], Float[Tensor, ""]]

SWEEP_FORMAT = "tl_circuits.SweepResult"
SWEEP_FORMAT_VERSION = 1
"""Written by :meth:`SweepResult.save` in its JSON (``format``, ``version``); checked by :meth:`SweepResult.load`."""


def sweep_result_files(path: Union[str, Path]) -> tuple[Path, Path]:
    """The (tensors, metadata) files of a saved :class:`SweepResult`: ``<stem>.safetensors`` and ``<stem>.json``.

    ``path`` is the stem, or either file (its suffix is dropped).

    >>> [f.name for f in sweep_result_files("out/ioi_sweep.json")]
    ['ioi_sweep.safetensors', 'ioi_sweep.json']
    """
    stem = Path(path)
    if stem.is_dir():
        raise ValueError(f"{stem} is a directory; give a file stem inside it, e.g. {stem / 'sweep'}")
    if stem.suffix in (".safetensors", ".json"):
        stem = stem.with_suffix("")
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


@dataclass
class SweepResult:
    """Metric of the model with each head's circuit frozen in turn.

    ``frozen[circuit][layer, head]``: the metric with that head's circuit frozen (NaN where not run);
    ``clean``: the metric of the unfrozen model; ``effect[circuit] = frozen[circuit] - clean``.
    :meth:`save` / :meth:`load` keep it on disk as a file pair (see :meth:`save`).
    """

    clean: float
    frozen: dict[str, Float[Tensor, "n_layers n_heads"]]
    replacement: str
    metric_name: str
    settings: dict = field(default_factory=dict)

    @property
    def effect(self) -> dict[str, Float[Tensor, "n_layers n_heads"]]:
        return {circuit: values - self.clean for circuit, values in self.frozen.items()}

    def top_heads(self, k: int = 5, circuit: str = "qk") -> list[tuple[int, int, float]]:
        """The k heads whose freeze moves the metric most (largest |effect|): (layer, head, effect)."""
        effect = self.effect[circuit]
        order = effect.abs().flatten().argsort(descending=True)[:k]
        n_heads = effect.shape[1]
        return [(int(i) // n_heads, int(i) % n_heads, float(effect.flatten()[i])) for i in order]

    def to_dataframe(self) -> DataFrame:
        import pandas as pd

        rows = []
        for circuit, values in self.frozen.items():
            cells = torch.cartesian_prod(torch.arange(values.shape[0]), torch.arange(values.shape[1])).tolist()
            for (layer, head), v in zip(cells, values.flatten().tolist()):
                rows.append(dict(circuit=circuit, layer=layer, head=head, metric=v, effect=v - self.clean))
        return pd.DataFrame(rows)

    def save(self, path: Union[str, Path]) -> tuple[Path, Path]:
        """Write the result as a file pair; returns ``(tensors_file, metadata_file)``.

        ``path`` is the common stem (or either file name; see :func:`sweep_result_files`):

        - ``<stem>.safetensors``: ``"clean"`` (float64, shape [1]) and ``"frozen.<circuit>"``
          ([n_layers, n_heads], dtype as held) — every number, NaN included, bit for bit;
        - ``<stem>.json``: ``format``, ``version``, ``replacement``, ``metric_name``, ``circuits`` (the order of
          ``frozen``) and ``settings``. Settings must be JSON values (tuples come back as lists).

        Existing files are overwritten; missing parent folders are made.

        >>> import tempfile, torch
        >>> result = SweepResult(clean=2.5, frozen={"qk": torch.tensor([[2.0, float("nan")]])},
        ...                      replacement="zero", metric_name="loss", settings={"seed": 0})
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     _ = result.save(f"{folder}/sweep")
        ...     loaded = SweepResult.load(f"{folder}/sweep")
        >>> loaded.clean, loaded.frozen["qk"], loaded.settings
        (2.5, tensor([[2., nan]]), {'seed': 0})
        """
        from safetensors.torch import save_file

        tensors_file, metadata_file = sweep_result_files(path)
        metadata = dict(format=SWEEP_FORMAT, version=SWEEP_FORMAT_VERSION, replacement=self.replacement,
                        metric_name=self.metric_name, circuits=list(self.frozen), settings=self.settings)
        try:
            text = json.dumps(metadata, indent=2)
        except (TypeError, ValueError) as error:
            raise TypeError(f"SweepResult.settings must hold only JSON values to be saved: {error}") from None
        tensors = {"clean": torch.tensor([self.clean], dtype=torch.float64)}
        for circuit, values in self.frozen.items():
            tensors[f"frozen.{circuit}"] = values.detach().cpu().contiguous()
        tensors_file.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tensors_file), metadata={"format": SWEEP_FORMAT})
        metadata_file.write_text(text + "\n", encoding="utf-8")
        return tensors_file, metadata_file

    @classmethod
    def load(cls, path: Union[str, Path]) -> "SweepResult":
        """Read a result written by :meth:`save` (``path``: the stem or either file).

        Raises ``FileNotFoundError`` naming a missing file and ``ValueError`` for a file that is corrupt
        or not a saved ``SweepResult``.
        """
        from safetensors.torch import load_file

        tensors_file, metadata_file = sweep_result_files(path)
        for file in (tensors_file, metadata_file):
            if not file.is_file():
                raise FileNotFoundError(f"cannot load a SweepResult from {path}: {file} is missing")
        try:
            metadata = json.loads(metadata_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{metadata_file} is not valid JSON (corrupt?): {error}") from None
        if not isinstance(metadata, dict) or metadata.get("format") != SWEEP_FORMAT:
            raise ValueError(f"{metadata_file} is not a saved SweepResult (no format {SWEEP_FORMAT!r})")
        if metadata.get("version") != SWEEP_FORMAT_VERSION:
            raise ValueError(f"{metadata_file} has SweepResult format version {metadata.get('version')!r}; "
                             f"this tl_circuits reads version {SWEEP_FORMAT_VERSION}")
        missing = [k for k in ("replacement", "metric_name", "circuits", "settings") if k not in metadata]
        if missing:
            raise ValueError(f"{metadata_file} lacks {', '.join(missing)} (corrupt?)")
        try:
            tensors = load_file(str(tensors_file))
        except Exception as error:  # safetensors raises its own SafetensorError for a bad header
            raise ValueError(f"{tensors_file} is not a readable safetensors file (corrupt?): {error}") from None
        wanted = ["clean"] + [f"frozen.{circuit}" for circuit in metadata["circuits"]]
        absent = [name for name in wanted if name not in tensors]
        if absent:
            raise ValueError(f"{tensors_file} lacks the tensors {absent} that {metadata_file.name} names (corrupt?)")
        if tensors["clean"].shape != (1,):
            raise ValueError(f"{tensors_file}: 'clean' has shape {tuple(tensors['clean'].shape)}, expected (1,)")
        return cls(clean=float(tensors["clean"][0]),
                   frozen={circuit: tensors[f"frozen.{circuit}"] for circuit in metadata["circuits"]},
                   replacement=metadata["replacement"], metric_name=metadata["metric_name"],
                   settings=metadata["settings"])

    def plot(self, title: Optional[str] = None) -> Figure:
        """Effect heatmap per circuit (diverging, centred at 0)."""
        from tl_circuits.plotting import plot_blocks

        effect = self.effect
        return plot_blocks(effect, blocks=list(effect), signed=True,
                           colorbar_label=f"Δ {self.metric_name}",
                           title=title or f"{self.replacement.upper()} freeze effect on {self.metric_name}")


def freeze_sweep(
    model: Model,
    tokens: Int[Tensor, "batch pos"],
    metric: Optional[Metric] = None,
    *,
    circuits: Sequence[Union[str, Circuit]] = ("qk", "ov"),
    replacement: Union[str, Replacement] = "zero",
    reference: Optional[ReferenceLike] = None,
    noise_scale: float = NOISE_SCALE,
    seed: Optional[int] = SEED,
    max_batch_rows: Optional[int] = None,
    progress: bool = True,
) -> SweepResult:
    """Freeze every head's circuit in turn and evaluate ``metric`` on the logits.

    Args:
        tokens: the input batch [batch, pos].
        metric: ``logits -> scalar`` (TransformerLens's patching-metric convention); default: the
            mean next-token cross-entropy loss on ``tokens``.
        circuits: which circuits to sweep, each giving an [n_layers, n_heads] tensor.
        replacement, reference, noise_scale, seed: as :func:`tl_circuits.freeze`. A RESAMPLE sweep
            with ``reference=clean_cache`` on corrupted ``tokens`` equals TransformerLens's
            ``patching.get_act_patch_attn_head_pattern_all_pos`` (QK) and
            ``get_act_patch_attn_head_out_all_pos`` (OV).
        max_batch_rows: most rows in one stacked forward (default: about 1 GB of logits).
    """
    spec = model_spec(model)
    check_tokens(spec, tokens)
    swept: list[Circuit] = [parse_option(Circuit, c, "circuit") for c in circuits]
    if not swept:
        raise ValueError("circuits is empty: name at least one of 'qk', 'ov', 'both'")
    replacement = parse_option(Replacement, replacement, "replacement")
    for circuit in swept:
        check_replacement_fits(replacement, circuit)
        check_qk_freezable(spec, circuit)
    check_noise_scale(noise_scale)
    if max_batch_rows is not None and max_batch_rows < 1:
        raise ValueError(f"max_batch_rows must be >= 1, got {max_batch_rows}")
    metric_name = getattr(metric, "__name__", "metric") if metric is not None else "loss"
    if metric is None:
        metric = lambda logits: lm_cross_entropy_loss(logits, tokens)  # noqa: E731

    all_heads = tuple((l, h) for l in range(spec.n_layers) for h in range(spec.n_heads))
    references = {}
    for circuit in swept:
        fspec = FreezeSpec(all_heads, circuit, replacement, GradientMode.STOPGRAD, float(noise_scale), seed)
        references[circuit] = prepare_reference(model, spec, fspec, reference, range(spec.n_layers))
    generator = freeze_generator(model, seed) if replacement == Replacement.NOISE else None

    batch, n_pos = tokens.shape
    if max_batch_rows is None:
        max_batch_rows = max(batch, GB // (n_pos * spec.d_vocab * 4))  # ~1 GB of float32 logits
    copies = [(circuit, head) for circuit in swept for head in range(spec.n_heads)]
    per_pass = max(1, min(len(copies), max_batch_rows // batch))
    passes = [copies[i:i + per_pass] for i in range(0, len(copies), per_pass)]

    resid_names = [spec.resid_pre_hook(layer) for layer in range(spec.n_layers)] if spec.starts_at_layer else []
    frozen = {c.value: torch.full((spec.n_layers, spec.n_heads), float("nan")) for c in swept}
    with torch.no_grad():
        clean_logits, cache = model.run_with_cache(tokens, names_filter=lambda name: name in resid_names)
        clean = float(metric(clean_logits))  # type: ignore[arg-type]  # run_with_cache's return type is loose
        del clean_logits
        share = SweepShare(spec.n_layers * len(passes), divisible=replacement != Replacement.NOISE)  # over ranks
        bar = tqdm(total=share.n_mine, desc="freeze sweep", disable=not progress)
        for layer in range(spec.n_layers):
            for chunk in passes:
                if not share.take(layer, chunk):
                    continue
                hooks = _stacked_hooks(model, spec, layer, chunk, batch, replacement, references, noise_scale,
                                       generator)
                with model.hooks(fwd_hooks=hooks):  # type: ignore[arg-type]  # TransformerLens wants a list of its union
                    if spec.starts_at_layer:
                        logits = model(cache[spec.resid_pre_hook(layer)].repeat(len(chunk), 1, 1), start_at_layer=layer)
                    else:  # a bridge runs every layer; those before `layer` compute what the cache holds
                        logits = model(tokens.repeat(len(chunk), 1))
                for j, (circuit, head) in enumerate(chunk):
                    frozen[circuit.value][layer, head] = float(metric(logits[j * batch:(j + 1) * batch]))
                del logits
                bar.update()
        bar.close()
    frozen = share.merge(frozen)
    settings = dict(circuits=[c.value for c in swept], noise_scale=noise_scale, seed=seed,
                    batch=batch, n_pos=n_pos, rows_per_pass=per_pass * batch)
    return SweepResult(clean=clean, frozen=frozen, replacement=replacement.value, metric_name=metric_name,
                       settings=settings)


def _tile(reference, copies: int):
    """Repeat a RESAMPLE reference (hook name -> [batch, ...]) for the stacked copies."""
    if not isinstance(reference, dict):
        return reference  # MEAN references broadcast over the batch
    return {name: t if t.shape[0] == 1 else t.repeat(copies, *([1] * (t.ndim - 1))) for name, t in reference.items()}


def _stacked_hooks(model, spec, layer, chunk, batch, replacement, references, noise_scale, generator) -> list[Hook]:
    """Hooks freezing head ``chunk[j]`` in rows ``[j*batch, (j+1)*batch)`` of a stacked batch."""
    hooks = []
    for circuit in dict.fromkeys(c for c, _ in chunk):
        heads = [h for c, h in chunk if c == circuit]
        row_mask = torch.zeros(len(chunk) * batch, len(heads), dtype=torch.bool)
        for j, (c, h) in enumerate(chunk):
            if c == circuit:
                row_mask[j * batch:(j + 1) * batch, heads.index(h)] = True
        layer_freeze = LayerFreeze(model, spec, layer, heads, circuit, replacement, GradientMode.STOPGRAD,
                                   _tile(references[circuit], len(chunk)), float(noise_scale), generator, row_mask)
        hooks.extend(layer_freeze.hooks())
    return hooks
