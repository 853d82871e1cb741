"""Hand references for every architecture of the support table, using nothing of tl_circuits.

Freezing: the unwrapped Hugging Face model runs with its *attention probabilities edited by hand* (one attention
family = one way in):

- ``eager``: every architecture whose attention calls its modeling module's ``eager_attention_forward`` (all but
  BLOOM and Falcon): that function is replaced, for the duration of the run, by one that calls HF's own and
  recomputes the output from the edited probabilities; HF's own (post-rotary, post-norm) q and k, mask, scaling
  and soft-cap are recorded;
- ``bloom`` and ``falcon``: hooks on modules every transformers version has, never on a modeling file's function
  (transformers 5.25 moved Falcon's softmax into an ``eager_attention_forward``: issue #20). q, k and v are sliced
  by hand from the fused ``query_key_value`` output (BLOOM: per head ``[q | k | v]``, ALiBi from the attention
  module's own ``alibi`` argument; Falcon multi-query: ``[Q (H·d) | K (d) | V (d)]``, rotated with HF's
  ``apply_rotary_pos_emb`` and the cos/sin the attention module was given), the probabilities computed by hand,
  and an edited head's z (edited probabilities times its values) written into ``dense``'s input. At every layer
  HF's own input to ``dense`` must equal the hand z of the unedited probabilities, so the hand attention is HF's.

Drift guard: a run in which some layer's attention was not seen fails with "the HF reference captured no attention
probabilities for layer N (transformers X.Y changed its attention code?)", not with a ``KeyError``.

OV freezes edit the input of the HF output projection (``o_proj``/``dense``/``out_proj``/``c_proj``): head h's
columns ``h·d..(h+1)·d``. Gradients: a per-sample ``loss.backward()`` loop on the unwrapped HF model with the
fused or split projection gradients sliced per head by hand (:func:`hand_rows`).
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Callable, Optional

import torch

from tests.architectures.zoo import ARCHS, D_HEAD, D_MODEL, N_HEADS

Edit = Callable[[dict], torch.Tensor]  # a layer's record -> its full edited probabilities [batch, H, q, k]


# ----- finding things in the HF model, by hand ------------------------------------------------------------------

def attention_module(hf, layer: int) -> torch.nn.Module:
    """The HF attention module of a layer: the one module of class ``*Attention`` with this ``layer_idx``."""
    for module in hf.modules():
        if type(module).__name__.endswith("Attention") and getattr(module, "layer_idx", None) == layer:
            return module
    raise LookupError(f"no attention module of layer {layer} in {type(hf).__name__}")


def output_projection(hf, layer: int) -> torch.nn.Module:
    attn = attention_module(hf, layer)
    for name in ("o_proj", "dense", "out_proj", "c_proj"):
        if hasattr(attn, name):
            return getattr(attn, name)
    raise LookupError(f"no output projection in {type(attn).__name__}")


def _family(name: str) -> str:
    return {"BloomForCausalLM": "bloom", "FalconForCausalLM": "falcon"}.get(name, "eager")


def _causal(q_len: int, k_len: int, like: torch.Tensor) -> torch.Tensor:
    allowed = torch.ones(q_len, k_len, dtype=torch.bool).tril(k_len - q_len)
    return torch.zeros(q_len, k_len, dtype=like.dtype).masked_fill(~allowed, torch.finfo(like.dtype).min)[None, None]


def _additive(mask: Optional[torch.Tensor], q_len: int, k_len: int, like: torch.Tensor) -> torch.Tensor:
    """A mask as an additive [batch|1, 1, q, k] tensor (HF gives additive floats or booleans, or None: causal)."""
    if mask is None:
        return _causal(q_len, k_len, like)
    mask = mask[..., :q_len, :k_len]
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=like.dtype).masked_fill(~mask, torch.finfo(like.dtype).min)
    return mask.to(like.dtype)


# ----- running the HF model with edited probabilities -------------------------------------------------------------

@contextlib.contextmanager
def _eager_patch(hf, edits: dict[int, Edit], records: dict[int, dict]):
    module = importlib.import_module(type(hf).__module__)
    if not hasattr(module, "eager_attention_forward"):
        raise AssertionError(f"{module.__name__} has no eager_attention_forward (transformers "
                             f"{transformers_version()} changed its attention code?)")
    original = module.eager_attention_forward

    def hand_attention(attn, query, key, value, attention_mask, *args, **kwargs):
        out, probs = original(attn, query, key, value, attention_mask, *args, **kwargs)
        layer = attn.layer_idx
        record = dict(q=query, k=key, probs=probs, scaling=kwargs.get("scaling"), softcap=kwargs.get("softcap"),
                      mask=_additive(attention_mask, query.shape[2], key.shape[2], probs), bias=0.0)
        records[layer] = record
        if layer not in edits:
            return out, probs
        probs = edits[layer](record).to(value.dtype)
        values = value.repeat_interleave(query.shape[1] // value.shape[1], dim=1)  # HF's repeat_kv
        return (probs @ values).transpose(1, 2).contiguous(), probs

    module.eager_attention_forward = hand_attention
    try:
        yield
    finally:
        module.eager_attention_forward = original


@contextlib.contextmanager
def _hooked_patch(hf, name: str, edits: dict[int, Edit], records: dict[int, dict]):
    """BLOOM and Falcon: q, k and v by hand from the fused projection's output, the probabilities by hand, and an
    edited head's z (its probabilities times its values) written into the output projection's input.

    Only modules every transformers version has are hooked (the attention module, ``query_key_value``, ``dense``),
    never a function of the modeling file, so where HF calls its softmax does not matter (issue #20). The hand
    attention is checked against HF's own at every layer: HF's input to ``dense`` must equal the hand z of the
    unedited probabilities, else the reference stops with a message naming the layer and the transformers version.
    """
    handles, state = [], {}
    n_layers = hf.config.num_hidden_layers

    def arguments(layer):
        def pre_hook(module, args, kwargs):
            state[layer] = dict(kwargs)
        return pre_hook

    def fused_output(layer):
        def hook(module, args, out):
            batch, pos = out.shape[:2]
            if name == "BloomForCausalLM":  # per head [q | k | v]
                heads = out.view(batch, pos, N_HEADS, 3, D_HEAD)
                q, k, v = (heads[..., i, :].transpose(1, 2) for i in range(3))
            else:  # Falcon multi-query: [Q (H heads) | K (1 head) | V (1 head)], then HF's rotary
                from transformers.models.falcon.modeling_falcon import apply_rotary_pos_emb

                heads = out.view(batch, pos, N_HEADS + 2, D_HEAD)
                q, k, v = (heads[:, :, s].transpose(1, 2) for s in (slice(0, N_HEADS), slice(N_HEADS, N_HEADS + 1),
                                                                    slice(N_HEADS + 1, N_HEADS + 2)))
                cos, sin = state[layer]["position_embeddings"]
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
            state[("qkv", layer)] = (q, k, v)
        return hook

    def hand_z(probs, v):  # [batch, H, q, k] @ [batch, G, k, d] -> HF's merged heads [batch, q, H·d]
        values = v.float().repeat_interleave(N_HEADS // v.shape[1], dim=1)
        return (probs.float() @ values).transpose(1, 2).flatten(2)

    def record_and_edit(layer):
        def pre_hook(module, args):
            q, k, v = state.pop(("qkv", layer))
            kwargs = state.pop(layer)
            bias = 0.0
            if name == "BloomForCausalLM":
                bias = kwargs["alibi"].view(q.shape[0], N_HEADS, 1, -1)[..., : k.shape[2]].float()
            record = dict(q=q, k=k, probs=None, scaling=D_HEAD**-0.5, softcap=None, bias=bias,
                          mask=_additive(kwargs.get("attention_mask"), q.shape[2], k.shape[2], q.float()))
            record["probs"] = torch.stack([softmax_of(record, q[:, h], k[:, h * k.shape[1] // N_HEADS], h)
                                           for h in range(N_HEADS)], 1)
            z = args[0]
            mine = hand_z(record["probs"], v)
            if not torch.allclose(mine, z.float(), rtol=1e-4, atol=1e-5):
                raise AssertionError(
                    f"the HF reference's hand attention of layer {layer} does not reproduce {name}'s own (max "
                    f"difference {(mine - z.float()).abs().max():.2e}; transformers {transformers_version()} changed "
                    "its attention code?)")
            records[layer] = record
            if layer not in edits:
                return None
            edited = edits[layer](record)
            z = z.clone()
            for h in range(N_HEADS):  # only the edited heads' columns: the others stay HF's own, bit for bit
                if not torch.equal(edited[:, h], record["probs"][:, h]):
                    cols = slice(h * D_HEAD, (h + 1) * D_HEAD)
                    z[..., cols] = hand_z(edited, v)[..., cols].to(z.dtype)
            return (z,) + tuple(args[1:])
        return pre_hook

    for layer in range(n_layers):
        attn = attention_module(hf, layer)
        handles.append(attn.register_forward_pre_hook(arguments(layer), with_kwargs=True))
        handles.append(attn.query_key_value.register_forward_hook(fused_output(layer)))
        # first among dense's pre-hooks, so that the recorded output-projection input is the edited z
        handles.append(attn.dense.register_forward_pre_hook(record_and_edit(layer), prepend=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def check_records(records: dict[int, dict], n_layers: int) -> None:
    """The drift guard: every layer's attention was seen by the reference (else HF runs attention elsewhere now)."""
    for layer in range(n_layers):
        if layer not in records:
            raise AssertionError(
                f"the HF reference captured no attention probabilities for layer {layer} (transformers "
                f"{transformers_version()} changed its attention code?)")


def run(hf, name: str, tokens: torch.Tensor, qk_edits: Optional[dict[int, Edit]] = None,
        o_edits: Optional[dict[int, Callable[[torch.Tensor], torch.Tensor]]] = None):
    """(logits, records, o inputs) of the HF model with the edits applied; records[layer] holds HF's q, k,
    probabilities, mask, scaling, soft-cap and position bias; o inputs[layer] the output projection's input."""
    records: dict[int, dict] = {}
    o_inputs: dict[int, torch.Tensor] = {}
    patch = _eager_patch if _family(name) == "eager" else (lambda h, e, r: _hooked_patch(h, name, e, r))
    handles = []
    for layer in range(hf.config.num_hidden_layers):
        def pre(module, args, layer=layer):
            x = args[0]
            o_inputs[layer] = x.detach().clone()
            if o_edits and layer in o_edits:
                return (o_edits[layer](x.clone()),) + tuple(args[1:])
            return None
        handles.append(output_projection(hf, layer).register_forward_pre_hook(pre))
    try:
        with torch.no_grad(), patch(hf, qk_edits or {}, records):
            logits = hf(tokens).logits
    finally:
        for handle in handles:
            handle.remove()
    check_records(records, hf.config.num_hidden_layers)
    return logits, records, o_inputs


# ----- the frozen probabilities and z of docs/spec.md §1.3, by hand --------------------------------------------

def softmax_of(record: dict, q: torch.Tensor, k: torch.Tensor, head: int) -> torch.Tensor:
    """softmax(softcap(scaling · q·kᵀ) + position bias + mask) of one head (q, k: [batch, pos, d] or [pos, d])."""
    scores = torch.einsum("...qd,...kd->...qk", q.float(), k.float())
    scaling = record["scaling"] if record["scaling"] is not None else D_HEAD**-0.5
    scores = scores * scaling
    if record["softcap"] is not None:
        scores = record["softcap"] * torch.tanh(scores / record["softcap"])
    bias = record["bias"]
    if torch.is_tensor(bias):
        scores = scores + bias[:, head]
    scores = scores + record["mask"][:, 0]
    return torch.softmax(scores, dim=-1)


def qk_edit(replacement: str, head: int, kv_head: int, reference: Optional[dict] = None,
            generator: Optional[torch.Generator] = None) -> Edit:
    """The edit of one head's probabilities for a QK freeze (a reference run's record for MEAN and RESAMPLE)."""
    def edit(record):
        probs = record["probs"].clone()
        batch, _, n_q, n_k = probs.shape
        q, k = record["q"][:, head], record["k"][:, kv_head]  # [batch, pos, d]
        if replacement == "zero":
            frozen = softmax_of(record, torch.zeros_like(q), torch.zeros_like(k), head)
        elif replacement == "mean":  # per-position means of HF's q and k over the reference batch
            frozen = softmax_of(record, reference["q"][:, head].mean(0), reference["k"][:, kv_head].mean(0), head)
        elif replacement == "noise":  # σ of the head's own q (k) over (batch, pos, d) times N(0, 1), q first
            noise_q = torch.randn((batch, n_q, 1, D_HEAD), generator=generator)[:, :, 0] * q.float().std()
            noise_k = torch.randn((batch, n_k, 1, D_HEAD), generator=generator)[:, :, 0] * k.float().std()
            frozen = softmax_of(record, noise_q, noise_k, head)
        elif replacement == "resample":
            frozen = reference["probs"][:, head]
        else:  # identity
            frozen = torch.eye(n_q, n_k).expand(batch, n_q, n_k)
        probs[:, head] = frozen.to(probs.dtype)
        return probs
    return edit


def ov_edit(replacement: str, head: int, reference: Optional[torch.Tensor] = None,
            generator: Optional[torch.Generator] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """The edit of the output projection's input (z) for an OV freeze of one head."""
    cols = slice(head * D_HEAD, (head + 1) * D_HEAD)

    def edit(z):
        if replacement == "zero":
            z[..., cols] = 0
        elif replacement == "mean":
            z[..., cols] = reference[..., cols].mean(0)
        elif replacement == "noise":
            noise = torch.randn((*z.shape[:2], 1, D_HEAD), generator=generator)[:, :, 0]
            z[..., cols] = noise * z[..., cols].float().std()
        else:  # resample
            z[..., cols] = reference[..., cols]
        return z
    return edit


# ----- per-head gradient rows sliced by hand from the HF parameters -----------------------------------------------

def _qkv_weights(name: str, attn) -> dict[str, tuple[torch.Tensor, Optional[torch.Tensor], str]]:
    """Block -> (weight grad, bias grad, "linear" | "conv1d") of the HF q/k/v parameters, the fused ones cut by
    hand into their Q, K and V rows (or columns)."""
    fused = ARCHS[name].fused
    n_kv = ARCHS[name].n_kv_heads
    if not fused:
        out = {}
        for block, proj in (("Q", "q_proj"), ("K", "k_proj"), ("V", "v_proj")):
            module = getattr(attn, proj)
            out[block] = (module.weight.grad, None if module.bias is None else module.bias.grad, "linear")
        return out
    module = {"phi3": "qkv_proj", "neox": "query_key_value", "falcon_mqa": "query_key_value", "bigcode": "c_attn",
              "gpt2": "c_attn"}[fused]
    module = getattr(attn, module)
    weight, bias = module.weight.grad, None if module.bias is None else module.bias.grad
    if fused == "gpt2":  # Conv1D [D, 3D]: columns [Q | K | V]
        return {b: (weight[:, i * D_MODEL:(i + 1) * D_MODEL], bias[i * D_MODEL:(i + 1) * D_MODEL], "conv1d")
                for i, b in enumerate("QKV")}
    if fused == "neox":  # Linear [3D, D]: rows per head [q_h | k_h | v_h]
        rows = weight.view(N_HEADS, 3, D_HEAD, D_MODEL)
        biases = None if bias is None else bias.view(N_HEADS, 3, D_HEAD)
        return {b: (rows[:, i].reshape(N_HEADS * D_HEAD, D_MODEL),
                    None if biases is None else biases[:, i].reshape(-1), "linear") for i, b in enumerate("QKV")}
    # [Q (H·d) | K (G·d) | V (G·d)] rows of a Linear: Phi-3, Falcon multi-query, GPT-BigCode multi-query
    sizes = [N_HEADS * D_HEAD, n_kv * D_HEAD, n_kv * D_HEAD]
    weights = weight.split(sizes, dim=0)
    biases = [None] * 3 if bias is None else bias.split(sizes)
    return {b: (weights[i], biases[i], "linear") for i, b in enumerate("QKV")}


def hand_rows(name: str, hf, layer: int, block: str, include_biases: bool) -> torch.Tensor:
    """[heads, row] of one layer's block from the HF parameters' .grad (head h: rows h·d..(h+1)·d of a Linear
    [out, in], transposed to [D, d]; columns of a Conv1D; O: columns of a Linear, rows of a Conv1D)."""
    attn = attention_module(hf, layer)
    heads = N_HEADS if block in "QO" else ARCHS[name].n_kv_heads
    out = []
    if block == "O":
        o = output_projection(hf, layer)
        conv1d = type(o).__name__ == "Conv1D"
        for h in range(heads):
            cols = slice(h * D_HEAD, (h + 1) * D_HEAD)
            out.append((o.weight.grad[cols] if conv1d else o.weight.grad[:, cols].T).flatten())
        return torch.stack(out)
    weight, bias, layout = _qkv_weights(name, attn)[block]
    for h in range(heads):
        rows = slice(h * D_HEAD, (h + 1) * D_HEAD)
        parts = [(weight[:, rows] if layout == "conv1d" else weight[rows].T).flatten()]
        if include_biases:
            parts.append(bias[rows])
        out.append(torch.cat(parts))
    return torch.stack(out)


def has_qkv_biases(name: str, hf) -> bool:
    """Whether the HF q/k/v projections have bias parameters (the hand reference has bias gradients)."""
    return _bias_parameter(name, hf) is not None


def _bias_parameter(name: str, hf):
    attn = attention_module(hf, 0)
    fused = {"phi3": "qkv_proj", "neox": "query_key_value", "falcon_mqa": "query_key_value", "bigcode": "c_attn",
             "gpt2": "c_attn"}.get(ARCHS[name].fused, "q_proj")
    return getattr(attn, fused).bias


def gradient_loop(name: str, hf, samples: list[torch.Tensor], include_biases: bool,
                  loss_of=None) -> dict[str, torch.Tensor]:
    """{block: [N, L, heads, row]}: one (unpadded) sample at a time, HF's own loss (labels = tokens) or
    ``loss_of(logits [pos, vocab], sample, i) -> scalar`` (a test's own loss), ``.backward()``, rows sliced by hand
    from the parameters' ``.grad``."""
    n_layers = hf.config.num_hidden_layers
    rows: dict[str, list] = {b: [] for b in "QKVO"}
    for i, sample in enumerate(samples):
        hf.zero_grad(set_to_none=True)
        if loss_of is None:
            hf(sample[None], labels=sample[None]).loss.backward()
        else:
            loss_of(hf(sample[None]).logits[0], sample, i).backward()
        for block in "QKVO":
            rows[block].append(torch.stack([hand_rows(name, hf, layer, block, include_biases)
                                            for layer in range(n_layers)]))
    hf.zero_grad(set_to_none=True)
    return {b: torch.stack(r) for b, r in rows.items()}
