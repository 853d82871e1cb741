"""Reference implementations the tests compare tl_circuits against, independent of its own code paths.

- Per-sample gradients: a plain per-sample ``loss.backward()`` loop with TransformerLens's own loss, rows
  sliced by hand per head (:func:`loop_reference`, :func:`hand_rows`); one batched forward under a freeze with
  each sample's loss differentiated separately (:func:`frozen_batch_loop`); HF models' own loss and parameter
  gradients sliced by hand from the fused / split projections (:func:`hf_loop`, :func:`gpt2_rows`,
  :func:`llama_rows`, :func:`slice_hf_gradient`, :func:`bridge_reference_gradients`); a loss mask's loss by a
  Python loop over a trimmed sample's positions (:func:`hand_masked_nll`, a ``loss_of`` of :func:`loop_reference`).
- Interference scores: SPEC §3 by explicit Python loops in float64 (:func:`brute_force`) and a vectorised
  float64 version over hand-made rows (:func:`scores_from_rows`); the EMA Fisher in closed form
  (:func:`ema_closed_form`).
- Freezing by hand: forward hooks editing the raw q/k/v projection outputs of an unwrapped HF model or native
  bridge (:func:`output_with_edits`, :func:`hf_logits_with_edits`, :func:`set_cols`, :func:`replace_cols`,
  :func:`head_cols`) and capturing a module's output (:func:`capture_module_output`).
- Statistics: statsmodels' multiple-testing corrections (:func:`multipletests`) and the statistic handed to
  scipy's permutation test and bootstrap (:func:`cell_stat`).

Model builders stay in ``tests/builders.py`` (over ``tl_circuits.testing``); synthetic score matrices in
``tests/stats/synthetic.py``. The per-architecture references (HF attention probabilities edited by hand for
every attention family, fused-QKV gradients sliced by hand) are in ``tests/architectures/references.py``, their
models in ``tests/architectures/zoo.py``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests import builders
from tl_circuits import GradientConfig, InterferenceConfig, freeze, testing
from tl_circuits.interference.factors import PerSampleGradients
from tl_circuits.models.spec import BLOCKS, model_spec

D, D_HEAD = 32, 8  # d_model and d_head of the builders' models
DAMP = dict(damping_abs=1e-6, damping_rel=0.05)  # large enough that damping matters in every check


def quiet_config(**settings) -> InterferenceConfig:
    """An InterferenceConfig without progress bars, for the tests: the gradient settings among ``settings``
    (``chunk_size``, ``include_biases``, ``memory_budget_gb``) go into its GradientConfig."""
    gradient_fields = {f.name for f in dataclasses.fields(GradientConfig)}
    gradients = {"progress": False, **{k: settings.pop(k) for k in list(settings) if k in gradient_fields}}
    return InterferenceConfig(gradients=GradientConfig(**gradients), **settings)


# ----- per-sample gradients: a plain per-sample backward loop, heads sliced by hand ----------------------------

def loop_reference(model, tokens, attention_mask=None, include_biases=False, loss_of=None):
    """Per-sample raw parameter gradients {name: [N, *param.shape]} by a plain loss.backward() loop.

    Padding is handled by *trimming* each sample to its (contiguous) valid tokens and using TL's own
    loss (``return_type="loss"``), so this reference shares no masking code with the library. ``loss_of``:
    another loss, ``loss_of(logits [pos, vocab], sample [pos], i, kept) -> scalar`` of the trimmed sample ``i``
    (``kept``: the positions of the untrimmed row it keeps), written by the test.
    """
    spec = model_spec(model)
    names = spec.attention_param_names(include_biases)
    params = dict(model.named_parameters())
    out = {name: [] for name in names}
    for i in range(tokens.shape[0]):
        sample, kept = tokens[i], torch.arange(tokens.shape[1])
        if attention_mask is not None:
            valid = attention_mask[i].bool()
            idx = valid.nonzero().flatten()
            assert bool(valid[idx[0]: idx[-1] + 1].all()), "reference needs left or right padding"
            sample, kept = sample[valid], idx
        model.zero_grad(set_to_none=True)
        if loss_of is None:
            model(sample[None], return_type="loss").backward()
        else:
            loss_of(model(sample[None], return_type="logits")[0], sample, i, kept).backward()
        for name in names:
            out[name].append(params[name].grad.detach().clone())
    model.zero_grad(set_to_none=True)
    return {name: torch.stack(gs) for name, gs in out.items()}


def hand_masked_nll(loss_mask, shift: int = 0):
    """Sample i's mean of −log p(token j+1 | ≤ j) over its positions j with ``loss_mask[i, j]`` set (the
    prediction of the next token), ``shift`` positions off for the deliberately wrong convention."""
    def loss_of(logits, sample, i, kept):
        terms = []
        for j in range(len(sample) - 1):  # j predicts sample[j + 1]; both are real tokens
            col = int(kept[j]) + shift
            if 0 <= col < loss_mask.shape[1] and loss_mask[i, col]:
                terms.append(-torch.log_softmax(logits[j].float(), -1)[sample[j + 1]])
        return torch.stack(terms).mean()
    return loss_of


def hand_rows(spec, raw, block, layer, head, include_biases=False):
    """[N, P] rows of one head, sliced by hand from raw gradients following SPEC §0's table.

    HookedTransformer parameters are per head already (``W_Q[h]``); a bridge's wrapped projections are sliced
    here by hand: nn.Linear weights are [out, in] (Q/K/V: head h is rows h·d..(h+1)·d; O: columns), Conv1D
    weights [in, out] (the other way round), each head transposed to [D, d] (Q/K/V) or [d, D] (O)."""
    w = raw[spec.param_name(layer, block)]
    cols = slice(head * spec.d_head, (head + 1) * spec.d_head)
    if spec.kind == "hooked":
        w = w[:, head]  # [N, D, d] (Q/K/V) or [N, d, D] (O)
    elif spec.weight_layout(block) == "linear":
        w = w[:, :, cols].transpose(1, 2) if block == "O" else w[:, cols, :].transpose(1, 2)
    else:  # conv1d
        w = w[:, cols, :] if block == "O" else w[:, :, cols]
    parts = [w.reshape(w.shape[0], -1)]
    if include_biases and block != "O":
        bias = raw[spec.param_name(layer, block, bias=True)]
        parts.append(bias[:, head] if spec.kind == "hooked" else bias[:, cols])
    return torch.cat(parts, dim=1)


def assert_rows_match(grads: PerSampleGradients, raw, atol=2e-6, rtol=1e-4):
    """Every head's rows equal the loop's, to float32 rounding: ``atol`` at least 10⁻⁵ of the block's largest entry
    (a float32 sum of a few hundred terms; an element much smaller than its block carries that block's rounding)."""
    spec = grads.spec
    for block in BLOCKS:
        for layer in range(spec.n_layers):
            expected = [hand_rows(spec, raw, block, layer, head, grads.include_biases).float()
                        for head in range(spec.n_block_heads(block))]
            scaled = max(atol, 1e-5 * max(float(e.abs().max()) for e in expected))
            for head, want in enumerate(expected):
                torch.testing.assert_close(grads.per_block[block][:, layer, head], want, atol=scaled, rtol=rtol,
                                           msg=f"{block} layer {layer} head {head}")


def frozen_batch_loop(model, tokens, **freeze_kwargs):
    """{param name: [N, ...]}: ONE batched forward under the freeze (TL's own per-token loss), then
    ``autograd.grad`` of each sample's token-mean loss separately: what a per-sample gradient under a freeze means."""
    spec = model_spec(model)
    names = spec.attention_param_names()
    params = dict(model.named_parameters())
    with freeze(model, **freeze_kwargs):
        per_token = model(tokens, return_type="loss", loss_per_token=True)  # [N, pos - 1]
        losses = per_token.mean(1)
        out = {name: [] for name in names}
        for i in range(tokens.shape[0]):
            grads = torch.autograd.grad(losses[i], [params[n] for n in names], retain_graph=True)
            for name, g in zip(names, grads):
                out[name].append(g.detach().clone())
    return {name: torch.stack(gs) for name, gs in out.items()}


# ----- interference scores by brute force ----------------------------------------------------------------------

def brute_force(spec, raw_a, raw_b, variant="unsigned", reduction="sum", source="a", loo=False,
                damping_abs=1e-6, damping_rel=0.05, normalization="diagonal", fisher=None):
    """SPEC §3 with explicit Python loops over blocks, layers, heads and pairs, in float64.

    ``normalization`` (SPEC §3.4): the damped normaliser of a slice's undamped diagonal f is f + λ ("diagonal"),
    mean(f) + λ for every parameter ("head") or √((f + λ)(mean(f) + λ)) ("hybrid"), λ = max(λ_abs, λ_rel·mean(f)),
    applied to the Fisher or, with ``loo``, to the sample's own leave-one-out Fisher. ``fisher``: an external
    undamped Fisher ``{block: [L, H, P]}`` used instead of the source's."""
    n_a = next(iter(raw_a.values())).shape[0]
    n_b = next(iter(raw_b.values())).shape[0]
    out = {}
    for block in BLOCKS:
        out[block] = torch.empty(n_a, n_b, spec.n_layers, spec.n_block_heads(block), dtype=torch.float64)
        for layer in range(spec.n_layers):
            for head in range(spec.n_block_heads(block)):
                ga = hand_rows(spec, raw_a, block, layer, head).double()
                gb = hand_rows(spec, raw_b, block, layer, head).double()
                members = {"a": ga, "b": gb, "pooled": torch.cat([ga, gb])}[source]
                n_f = members.shape[0]
                f_slice = (members**2).mean(0) if fisher is None else fisher[block][layer, head].double()

                def normaliser(g_own, f_slice=f_slice, n_f=n_f):
                    f = (n_f * f_slice - g_own**2) / (n_f - 1) if loo else f_slice
                    lam = max(damping_abs, damping_rel * float(f.mean()))
                    if normalization == "diagonal":
                        return f + lam
                    if normalization == "head":
                        return torch.full_like(f, float(f.mean()) + lam)
                    return torch.sqrt((f + lam) * (float(f.mean()) + lam))

                for i in range(n_a):
                    for j in range(n_b):
                        if variant == "unsigned":
                            m = (ga[i] ** 2 / normaliser(ga[i]) * gb[j].abs()).sum()
                        elif variant == "signed":
                            m = (ga[i] * gb[j] / normaliser(ga[i])).sum()
                        else:
                            m = 0.5 * ((ga[i] ** 2 / normaliser(ga[i]) * gb[j].abs()).sum()
                                       + (gb[j] ** 2 / normaliser(gb[j]) * ga[i].abs()).sum())
                        if reduction == "mean":
                            m = m / ga.shape[1]
                        out[block][i, j, layer, head] = m
    return out


def assert_scores_close(got, expect, rtol=2e-4):
    for block in BLOCKS:
        scale = float(expect[block].abs().max())
        torch.testing.assert_close(got[block].double(), expect[block], rtol=rtol, atol=rtol * scale,
                                   msg=lambda m: f"block {block}: {m}")


def scores_from_rows(rows_a, rows_b, damping_abs, damping_rel):
    """Unsigned scores, Fisher of A, vectorised in float64 over hand-made rows (independent of the library)."""
    out = {}
    for b in BLOCKS:
        ga, gb = rows_a[b].double(), rows_b[b].double()
        fisher = (ga**2).mean(0)
        fisher = fisher + torch.clamp(damping_rel * fisher.mean(-1, keepdim=True), min=damping_abs)
        out[b] = torch.einsum("ilhp,jlhp->ijlh", ga**2 / fisher, gb.abs())
    return out


# ----- the EMA Fisher in closed form ---------------------------------------------------------------------------

def ema_closed_form(stream: torch.Tensor, beta: float) -> torch.Tensor:
    """Σ_k (1-β) β^(t-k) c_k / (1 - β^t), k = 1..t, in float64."""
    t = stream.shape[0]
    weights = torch.tensor([(1 - beta) * beta ** (t - k) for k in range(1, t + 1)], dtype=torch.float64)
    return (weights[:, None] * stream.double()).sum(0) / (1 - beta**t)


# ----- HF / bridge parameter gradients sliced by hand ----------------------------------------------------------

def hf_loop(hf, tokens):
    """Per-sample HF parameter gradients with HF's own loss (labels=tokens: token-mean next-token CE)."""
    params = dict(hf.named_parameters())
    out = {name: [] for name in params}
    for i in range(tokens.shape[0]):
        hf.zero_grad(set_to_none=True)
        hf(tokens[i:i + 1], labels=tokens[i:i + 1]).loss.backward()
        for name, p in params.items():
            if p.grad is not None:
                out[name].append(p.grad.detach().clone())
    hf.zero_grad(set_to_none=True)
    return {name: torch.stack(g) for name, g in out.items() if g}


def gpt2_rows(raw, n_layers, n_heads, d_head):
    """GPT-2 by hand: c_attn is Conv1D [D, 3D] with columns [Q|K|V], head h at columns h·d..(h+1)·d of each;
    c_proj is Conv1D [D, D] whose *rows* h·d..(h+1)·d belong to head h. Biases appended to Q/K/V rows."""
    d_model = n_heads * d_head
    rows = {b: [] for b in BLOCKS}
    for layer in range(n_layers):
        w = raw[f"transformer.h.{layer}.attn.c_attn.weight"]  # [N, D, 3D]
        bias = raw[f"transformer.h.{layer}.attn.c_attn.bias"]  # [N, 3D]
        w_o = raw[f"transformer.h.{layer}.attn.c_proj.weight"]  # [N, D(in = heads·d), D]
        per_layer = {b: [] for b in BLOCKS}
        for k, block in enumerate("QKV"):
            for h in range(n_heads):
                cols = slice(k * d_model + h * d_head, k * d_model + (h + 1) * d_head)
                per_layer[block].append(torch.cat([w[:, :, cols].flatten(1), bias[:, cols]], dim=1))
        for h in range(n_heads):
            per_layer["O"].append(w_o[:, h * d_head:(h + 1) * d_head, :].flatten(1))
        for b in BLOCKS:
            rows[b].append(torch.stack(per_layer[b], dim=1))
    return {b: torch.stack(r, dim=1) for b, r in rows.items()}  # [N, L, H, P]


def llama_rows(raw, n_layers, n_heads, n_kv, d_head):
    """LLaMA by hand: q/k/v_proj are Linear [heads·d, D] (rows per head, transposed to [D, d]); o_proj is
    Linear [D, heads·d] whose *columns* belong to a head (transposed to [d, D])."""
    rows = {b: [] for b in BLOCKS}
    for layer in range(n_layers):
        pre = f"model.layers.{layer}.self_attn."
        per_layer = {}
        for block, proj, heads in (("Q", "q_proj", n_heads), ("K", "k_proj", n_kv), ("V", "v_proj", n_kv)):
            w = raw[pre + proj + ".weight"]  # [N, heads·d, D]
            per_layer[block] = [w[:, h * d_head:(h + 1) * d_head, :].transpose(1, 2).flatten(1) for h in range(heads)]
        w_o = raw[pre + "o_proj.weight"]  # [N, D, heads·d]
        per_layer["O"] = [w_o[:, :, h * d_head:(h + 1) * d_head].transpose(1, 2).flatten(1) for h in range(n_heads)]
        for b in BLOCKS:
            rows[b].append(torch.stack(per_layer[b], dim=1))
    return {b: torch.stack(r, dim=1) for b, r in rows.items()}


def slice_hf_gradient(name, hf, layer, block, head, include_biases):
    """One head's gradient row sliced by hand from the HF parameters' .grad (SPEC §0 layout)."""
    d = D_HEAD
    if name == "gpt2":
        attn = hf.transformer.h[layer].attn
        if block == "O":  # Conv1D c_proj weight [in = H·d, out = D]: head h is rows h·d..(h+1)·d
            return attn.c_proj.weight.grad[head * d:(head + 1) * d].flatten()
        offset = "QKV".index(block) * D  # Conv1D c_attn weight [D, 3D] = [Q | K | V] columns
        cols = slice(offset + head * d, offset + (head + 1) * d)
        parts = [attn.c_attn.weight.grad[:, cols].flatten()]
        if include_biases:
            parts.append(attn.c_attn.bias.grad[cols])
        return torch.cat(parts)
    if name == "llama":
        attn = hf.model.layers[layer].self_attn
        proj = {"Q": attn.q_proj, "K": attn.k_proj, "V": attn.v_proj, "O": attn.o_proj}[block]
    else:  # native bridge: its NativeAttention's nn.Linear modules
        attn = hf.blocks[layer].attn
        proj = getattr(attn, block.lower()).original_component
    if block == "O":  # Linear weight [out = D, in = H·d]: head h is columns h·d..(h+1)·d
        return proj.weight.grad[:, head * d:(head + 1) * d].T.flatten()
    rows = slice(head * d, (head + 1) * d)  # Linear weight [out = heads·d, in = D]
    parts = [proj.weight.grad[rows].T.flatten()]
    if include_biases:
        parts.append(proj.bias.grad[rows])
    return torch.cat(parts)


def bridge_reference_gradients(name, tokens, mask, include_biases, spec):
    """PerSampleGradients from a loss.backward() loop on an unwrapped HF model (a fresh native bridge),
    each padded sample trimmed to its tokens, rows sliced by hand."""
    model = {"gpt2": builders.hf_gpt2_model, "llama": builders.hf_llama_model,
             "native": builders.native_bridge}[name](0)
    rows = {b: torch.zeros(tokens.shape[0], spec.n_layers, spec.n_block_heads(b),
                           spec.n_params_per_head(b, include_biases)) for b in "QKVO"}
    for i in range(tokens.shape[0]):
        sample = tokens[i][mask[i].bool()][None]
        model.zero_grad(set_to_none=True)
        if name == "native":
            model(sample, return_type="loss").backward()
        else:  # HF's own loss: token-mean next-token cross-entropy
            model(sample, labels=sample).loss.backward()
        for b in "QKVO":
            for layer in range(spec.n_layers):
                for head in range(spec.n_block_heads(b)):
                    rows[b][i, layer, head] = slice_hf_gradient(name, model, layer, b, head, include_biases)
    return PerSampleGradients(rows, spec, include_biases)


# ----- freezing by hand: edited projection outputs of an unwrapped model ---------------------------------------

def output_with_edits(model, tokens, edits):
    """What ``model`` outputs with forward hooks ``{module: edit(output) -> output}`` (no grad; hooks removed on
    every exit)."""
    handles = [module.register_forward_hook(lambda m, a, out, edit=edit: edit(out.clone()))
               for module, edit in edits.items()]
    try:
        with torch.no_grad():
            return model(tokens)
    finally:
        for handle in handles:
            handle.remove()


def hf_logits_with_edits(hf, tokens, edits):
    """An HF model's logits with forward hooks ``{module: edit(output) -> output}`` on its projections."""
    return output_with_edits(hf, tokens, edits).logits


def head_cols(offset, head):
    """The columns of one head inside a projection output (heads of D_HEAD columns from ``offset`` on)."""
    return slice(offset + head * D_HEAD, offset + (head + 1) * D_HEAD)


def set_cols(value_of, column_sets):
    """An edit that sets the given column sets of a projection output to ``value_of(out, cols)``."""
    def edit(out):
        for cols in column_sets:
            out[..., cols] = value_of(out, cols)
        return out
    return edit


def replace_cols(out, ref, heads):
    """``out`` (a copy) with the columns of ``heads`` (from offset 0) taken from ``ref``."""
    out = out.clone()
    for h in heads:
        out[..., head_cols(0, h)] = ref[..., head_cols(0, h)]
    return out


def capture_module_output(hf, tokens: torch.Tensor, module) -> torch.Tensor:
    """What ``module`` outputs while ``hf`` runs ``tokens`` (no grad; the hook is removed on every exit)."""
    store = {}
    handle = module.register_forward_hook(lambda mod, args, out: store.setdefault("out", out.detach().clone()))
    try:
        with torch.no_grad():
            hf(tokens)
    finally:
        handle.remove()
    return store["out"]


# ----- statistics ----------------------------------------------------------------------------------------------

def multipletests(p, method):
    """statsmodels (a test-only dependency) as the reference for BH/BY; skips only the tests that use it."""
    return pytest.importorskip("statsmodels.stats.multitest").multipletests(p, method=method)


def cell_stat(m_cell):
    """scipy-style vectorised statistic of index samples: mean of m over x-rows, y-columns."""
    def statistic(x, y, axis=-1):
        x = np.asarray(x).astype(int)
        y = np.asarray(y).astype(int)
        x, y = np.broadcast_arrays(x[..., :, None], y[..., None, :])
        return m_cell[x, y].mean(axis=(-2, -1))
    return statistic


def head_slice(spec, tensors, name, layer, head):
    """One head's slice of a per-parameter tensor (e.g. a ``.grad``) named the HookedTransformer way (``"W_Q"``,
    ``"b_K"``...), sliced by hand as :func:`hand_rows` does (K/V heads are KV heads); None where the model has
    no such parameter (a bridge around LLaMA has no biases)."""
    block, bias = name[-1], name.startswith("b")
    try:
        param = spec.param_name(layer, block, bias=bias)
    except ValueError:
        return None
    rows = hand_rows(spec, {spec.param_name(layer, block): tensors[spec.param_name(layer, block)][None],
                            **({param: tensors[param][None]} if bias else {})}, block, layer, head, bias)[0]
    return rows[-spec.d_head:] if bias else rows


# ----- the model is left as it was ---------------------------------------------------------------------

def model_state(model, tokens):
    """What a call must not change (tl_circuits.testing.model_state): the outputs on ``tokens``, every parameter
    (value, ``requires_grad``, ``.grad``, storage), buffer, hook and train/eval mode."""
    return testing.model_state(model, tokens)


def assert_same_state(before, after, what):
    """Two :func:`model_state` records are the same (``what`` names the call in the message)."""
    differences = testing.state_differences(before, after)
    assert not differences, f"{what}: " + "; ".join(differences)
