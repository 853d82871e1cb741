"""QK/OV circuit freezing: exactness, references, gradients, hook hygiene, bad input (SPEC §1)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from transformer_lens import patching

from tests import builders
from tests.reference import head_slice
from tl_circuits import compute_mean_activations, freeze
from tl_circuits.freezing import freeze_hooks, normalize_heads
from tl_circuits.models import model_spec


REPLACEMENTS = ["zero", "mean", "noise", "resample"]
LAYER, HEAD = 1, 0  # under GQA head 1 is HEAD's sibling on KV head 0


def _run(model, tokens):
    """Logits and every layer's pattern and z."""
    names = lambda n: n.endswith("hook_pattern") or n.endswith("hook_z")  # noqa: E731
    logits, cache = model.run_with_cache(tokens, names_filter=names)
    return logits, cache


def _reference(model, replacement, tokens):
    if replacement == "mean":
        return compute_mean_activations(model, builders.random_tokens(8, tokens.shape[1], seed=5), progress=False)
    if replacement == "resample":
        return builders.random_tokens(*tokens.shape, seed=6)
    return None


def _uniform_causal(n_pos):
    return F.softmax(torch.zeros(n_pos, n_pos).masked_fill(~torch.ones(n_pos, n_pos).tril().bool(), float("-inf")), -1)


# ----- exactness -------------------------------------------------------------------------------

@pytest.mark.parametrize("circuit", ["qk", "ov", "both"])
@pytest.mark.parametrize("replacement", REPLACEMENTS + ["identity"])
def test_unselected_heads_bit_identical(model, tokens, circuit, replacement):
    if replacement == "identity" and circuit != "qk":
        pytest.skip("IDENTITY is QK only")
    spec = model_spec(model)
    _, clean = _run(model, tokens)
    with freeze(model, [(LAYER, HEAD)], circuit, replacement, reference=_reference(model, replacement, tokens)):
        _, frozen = _run(model, tokens)
    for layer in range(LAYER + 1):
        for head in range(spec.n_heads):
            if (layer, head) == (LAYER, HEAD):
                continue
            for hook in ("hook_pattern", "hook_z"):
                name = f"blocks.{layer}.attn.{hook}"
                head_axis = 1 if hook == "hook_pattern" else 2
                assert torch.equal(clean[name].select(head_axis, head),
                                   frozen[name].select(head_axis, head)), (name, head)
    z_name = f"blocks.{LAYER}.attn.hook_z"
    frozen_head_changed = not torch.equal(clean[z_name][:, :, HEAD], frozen[z_name][:, :, HEAD])
    assert frozen_head_changed


def test_qk_zero_is_uniform_causal(model, tokens):
    with freeze(model, [(LAYER, HEAD)], "qk", "zero"):
        _, cache = _run(model, tokens)
    pattern = cache[f"blocks.{LAYER}.attn.hook_pattern"][:, HEAD]
    expected = torch.tril(torch.ones(tokens.shape[1], tokens.shape[1])) / torch.arange(1, tokens.shape[1] + 1)[:, None]
    torch.testing.assert_close(pattern, expected.expand_as(pattern), rtol=0, atol=0)


@pytest.mark.needs_hooked_transformer  # attention-only and bias-free HookedTransformerConfig models
@pytest.mark.parametrize("which", ["attn_only", "no_biases"])
def test_exactness_on_other_fixtures(which, tokens):
    model = builders.attn_only() if which == "attn_only" else builders.mha(biases=False)
    _, clean = _run(model, tokens)
    with freeze(model, [(LAYER, HEAD)], "both", "zero"):
        _, frozen = _run(model, tokens)
    pattern, z = f"blocks.{LAYER}.attn.hook_pattern", f"blocks.{LAYER}.attn.hook_z"
    others = [h for h in range(4) if h != HEAD]
    assert torch.equal(clean[pattern][:, others], frozen[pattern][:, others])
    assert torch.equal(clean[z][:, :, others], frozen[z][:, :, others])
    assert torch.count_nonzero(frozen[z][:, :, HEAD]) == 0
    n = tokens.shape[1]
    uniform = torch.tril(torch.ones(n, n)) / torch.arange(1, n + 1)[:, None]
    assert torch.equal(frozen[pattern][:, HEAD], uniform.expand(tokens.shape[0], -1, -1))


def test_qk_zero_equals_zeroing_hook_q(mha_model, tokens):
    """SPEC §0: zeroing hook_q for a head gives an exactly uniform causal pattern — same z as the freeze."""
    def zero_q(q, hook):
        q = q.clone()
        q[:, :, HEAD] = 0
        return q
    by_hand = mha_model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{LAYER}.attn.hook_q", zero_q)])
    with freeze(mha_model, [(LAYER, HEAD)], "qk", "zero"):
        frozen = mha_model(tokens)
    torch.testing.assert_close(frozen, by_hand, rtol=1e-6, atol=1e-6)


def test_qk_identity_pattern(model, tokens):
    with freeze(model, [(LAYER, HEAD)], "qk", "identity"):
        _, cache = _run(model, tokens)
    pattern = cache[f"blocks.{LAYER}.attn.hook_pattern"][:, HEAD]
    assert torch.equal(pattern, torch.eye(tokens.shape[1]).expand_as(pattern))
    v = model.run_with_cache(tokens)[1][f"blocks.{LAYER}.attn.hook_v"][:, :, model_spec(model).kv_head(HEAD)]
    with freeze(model, [(LAYER, HEAD)], "qk", "identity"):
        _, cache = _run(model, tokens)
    torch.testing.assert_close(cache[f"blocks.{LAYER}.attn.hook_z"][:, :, HEAD], v, rtol=0, atol=0)  # z_t = v_t


@pytest.mark.parametrize("circuit", ["ov", "both"])
def test_identity_on_ov_raises(mha_model, circuit):
    with pytest.raises(ValueError, match="IDENTITY"):
        freeze(mha_model, [(0, 0)], circuit, "identity")


def test_qk_resample_is_reference_pattern_and_tl_patching(model):
    clean_tokens, corrupted = builders.random_tokens(3, 10, seed=1), builders.random_tokens(3, 10, seed=2)
    _, clean_cache = model.run_with_cache(clean_tokens)
    with freeze(model, [(LAYER, HEAD)], "qk", "resample", reference=clean_tokens):
        logits, cache = _run(model, corrupted)
    name = f"blocks.{LAYER}.attn.hook_pattern"
    assert torch.equal(cache[name][:, HEAD], clean_cache[name][:, HEAD])
    metric = lambda logits: logits[:, -1, 7].mean()  # noqa: E731
    tl = patching.get_act_patch_attn_head_pattern_all_pos(model, corrupted, clean_cache, metric)
    torch.testing.assert_close(metric(logits), tl[LAYER, HEAD], rtol=0, atol=0)


def test_ov_resample_is_reference_z_and_tl_patching(model):
    clean_tokens, corrupted = builders.random_tokens(3, 10, seed=1), builders.random_tokens(3, 10, seed=2)
    _, clean_cache = model.run_with_cache(clean_tokens)
    with freeze(model, [(LAYER, HEAD)], "ov", "resample", reference=clean_cache):
        logits, cache = _run(model, corrupted)
    name = f"blocks.{LAYER}.attn.hook_z"
    assert torch.equal(cache[name][:, :, HEAD], clean_cache[name][:, :, HEAD])
    metric = lambda logits: logits[:, -1, 7].mean()  # noqa: E731
    tl = patching.get_act_patch_attn_head_out_all_pos(model, corrupted, clean_cache, metric)
    torch.testing.assert_close(metric(logits), tl[LAYER, HEAD], rtol=0, atol=0)


@pytest.mark.parametrize("per_position", [True, False])
def test_mean_reference_is_dataset_mean(model, per_position):
    spec = model_spec(model)
    ref_tokens = builders.random_tokens(10, 8, seed=3)
    means = compute_mean_activations(model, ref_tokens, per_position=per_position, chunk_size=4, progress=False)
    _, cache = model.run_with_cache(ref_tokens)
    dims = (0,) if per_position else (0, 1)
    for layer in range(spec.n_layers):
        torch.testing.assert_close(means.z[layer], cache[f"blocks.{layer}.attn.hook_z"].mean(dims))
        torch.testing.assert_close(means.q[layer], cache[spec.query_hook(layer)].mean(dims))
        torch.testing.assert_close(means.k[layer], cache[spec.key_hook(layer)].mean(dims))
    assert means.k[0].shape[-2] == spec.n_kv_heads


def test_mean_reference_chunks_by_budget_and_the_old_batch_size_still_works(model):
    from tl_circuits.deprecation import TLCircuitsDeprecationWarning
    from tl_circuits.interference import memory

    ref_tokens = builders.random_tokens(10, 8, seed=3)
    whole = compute_mean_activations(model, ref_tokens, progress=False)
    three = 3.5 * memory.forward_row_bytes(model_spec(model), 8, cached_heads=3) / 2**30   # 3 samples fit
    by_budget = compute_mean_activations(model, ref_tokens, memory_budget_gb=three, progress=False)
    with pytest.warns(TLCircuitsDeprecationWarning, match="batch_size= is deprecated; use chunk_size="):
        old = compute_mean_activations(model, ref_tokens, batch_size=3, progress=False)
    by_chunk = compute_mean_activations(model, ref_tokens, chunk_size=3, progress=False)
    for layer in whole.z:
        assert torch.equal(old.z[layer], by_chunk.z[layer]) and torch.equal(by_budget.z[layer], by_chunk.z[layer])
        torch.testing.assert_close(by_chunk.z[layer], whole.z[layer])
    with pytest.raises(ValueError, match="not both"), pytest.warns(TLCircuitsDeprecationWarning):
        compute_mean_activations(model, ref_tokens, batch_size=3, chunk_size=4, progress=False)


@pytest.mark.parametrize("per_position", [True, False])
def test_mean_freeze_writes_dataset_means(model, per_position):
    spec = model_spec(model)
    tokens = builders.random_tokens(2, 8, seed=4)
    means = compute_mean_activations(model, builders.random_tokens(10, 8, seed=3), per_position=per_position,
                                     progress=False)
    with freeze(model, [(LAYER, HEAD)], "both", "mean", reference=means):
        _, cache = _run(model, tokens)
    z_mean = means.z[LAYER][..., HEAD, :]
    z = cache[f"blocks.{LAYER}.attn.hook_z"][:, :, HEAD]
    torch.testing.assert_close(z, z_mean.expand_as(z), rtol=0, atol=0)
    assert z.std(dim=-1).min() > 0  # a d_head vector, not a scalar mean over d_head
    # the pattern comes from the mean query and mean key, by hand:
    q = means.q[LAYER][..., HEAD, :].expand(8, -1)
    k = means.k[LAYER][..., spec.kv_head(HEAD), :].expand(8, -1)
    scores = (q @ k.T) / spec.d_head ** 0.5
    scores = scores.masked_fill(~torch.ones(8, 8).tril().bool(), float("-inf"))
    torch.testing.assert_close(cache[f"blocks.{LAYER}.attn.hook_pattern"][:, HEAD],
                               F.softmax(scores, -1).expand(2, -1, -1))


def test_noise_is_seeded_and_relative(model, tokens):
    def frozen_z(seed, scale=0.5):
        with freeze(model, [(LAYER, HEAD)], "ov", "noise", noise_scale=scale, seed=seed):
            return _run(model, tokens)[1][f"blocks.{LAYER}.attn.hook_z"][:, :, HEAD]
    assert torch.equal(frozen_z(3), frozen_z(3))
    assert not torch.equal(frozen_z(3), frozen_z(4))
    # exactly noise_scale x the head's own activation std x N(0, 1) from a generator seeded with `seed`
    clean_z = _run(model, tokens)[1][f"blocks.{LAYER}.attn.hook_z"][:, :, HEAD]
    expected = torch.randn(clean_z.shape, generator=torch.Generator().manual_seed(3)) * clean_z.std() * 0.5
    torch.testing.assert_close(frozen_z(3), expected)


def test_qk_noise_is_seeded(model, tokens):
    def pattern(seed):
        with freeze(model, [(LAYER, HEAD)], "qk", "noise", seed=seed):
            return _run(model, tokens)[1][f"blocks.{LAYER}.attn.hook_pattern"][:, HEAD]
    assert torch.equal(pattern(0), pattern(0))
    assert not torch.equal(pattern(0), pattern(1))


# ----- gradients -------------------------------------------------------------------------------

def _grads(model, tokens, **freeze_kwargs):
    model.zero_grad(set_to_none=True)
    with freeze(model, [(LAYER, HEAD)], **freeze_kwargs):
        loss = model(tokens, return_type="loss")
    loss.backward()
    grads = {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("replacement", ["zero", "mean", "noise", "resample", "identity"])
def test_stopgrad_qk_blocks_query_key_gradient(mha_model, tokens, replacement):
    ref = _reference(mha_model, replacement, tokens)
    _, grads = _grads(mha_model, tokens, circuit="qk", replacement=replacement, reference=ref)
    spec = model_spec(mha_model)
    for name in ("W_Q", "b_Q", "W_K", "b_K"):
        assert torch.count_nonzero(head_slice(spec, grads, name, LAYER, HEAD)) == 0, name
        assert torch.count_nonzero(head_slice(spec, grads, name, LAYER, HEAD + 1)) > 0, name  # others still learn


@pytest.mark.parametrize("replacement", REPLACEMENTS)
def test_stopgrad_ov_blocks_value_gradient(mha_model, tokens, replacement):
    ref = _reference(mha_model, replacement, tokens)
    _, grads = _grads(mha_model, tokens, circuit="ov", replacement=replacement, reference=ref)
    spec = model_spec(mha_model)
    for name in ("W_V", "b_V", "W_Q", "W_K"):
        assert torch.count_nonzero(head_slice(spec, grads, name, LAYER, HEAD)) == 0, name
    assert torch.count_nonzero(head_slice(spec, grads, "W_V", LAYER, HEAD + 1)) > 0


def test_stopgrad_gqa_query_gradient(gqa_model, tokens):
    _, grads = _grads(gqa_model, tokens, circuit="qk", replacement="zero")
    spec = model_spec(gqa_model)
    assert torch.count_nonzero(head_slice(spec, grads, "W_Q", LAYER, HEAD)) == 0
    assert torch.count_nonzero(head_slice(spec, grads, "W_K", LAYER, 0)) > 0  # sibling head 1 still uses KV head 0


@pytest.mark.parametrize("circuit", ["qk", "ov"])
@pytest.mark.parametrize("replacement", ["zero", "mean", "resample"])
def test_straight_through_forward_equals_frozen(model, tokens, circuit, replacement):
    ref = _reference(model, replacement, tokens)
    with freeze(model, [(LAYER, HEAD)], circuit, replacement, reference=ref):
        stop = model(tokens)
    with freeze(model, [(LAYER, HEAD)], circuit, replacement, reference=ref, preserve_gradients=True):
        straight = model(tokens)
    assert torch.equal(stop, straight)


def _true_gradient_at(model, tokens, hook_name, head_axis, upstream_grad, params):
    """Hand-computed reference: d<act_h(θ), G>/dθ on the *unfrozen* model, G = dL/d(act_h) of the frozen run."""
    captured = {}
    def grab(act, hook):
        captured["act"] = act
    model.zero_grad(set_to_none=True)
    model.run_with_hooks(tokens, fwd_hooks=[(hook_name, grab)])
    (captured["act"].select(head_axis, HEAD) * upstream_grad).sum().backward()
    out = _head_grads(model, params)
    model.zero_grad(set_to_none=True)
    return out


def _own_params(model, names):
    """Parameters that only the frozen head uses (under GQA its K/V weights are shared with a sibling), that the
    model has (a bridge around LLaMA has no biases)."""
    spec = model_spec(model)
    params = dict(model.named_parameters())
    return [w for w in names if not (spec.grouped and w[-1] in "KV")
            and head_slice(spec, params, w, LAYER, HEAD) is not None]


def _head_grads(model, names):
    """{HookedTransformer-style name: the frozen head's slice of that parameter's .grad}."""
    spec = model_spec(model)
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
    return {name: head_slice(spec, grads, name, LAYER, HEAD).clone() for name in names}


@pytest.mark.parametrize("replacement", ["zero", "mean", "resample", "identity"])
def test_straight_through_qk_restores_query_key_gradients(model, tokens, replacement):
    ref = _reference(model, replacement, tokens)
    hook_name, captured = f"blocks.{LAYER}.attn.hook_pattern", {}
    def keep_grad(pattern, hook):  # registered after the freeze: sees the written pattern
        pattern.retain_grad()
        captured["pattern"] = pattern
    model.zero_grad(set_to_none=True)
    with freeze(model, [(LAYER, HEAD)], "qk", replacement, reference=ref, gradient="straight_through"):
        model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(hook_name, keep_grad)]).backward()
    params = _own_params(model, ("W_Q", "W_K", "b_Q", "b_K"))
    st = _head_grads(model, params)
    upstream = captured["pattern"].grad[:, HEAD]
    expected = _true_gradient_at(model, tokens, hook_name, 1, upstream, params)
    for name in params:
        assert torch.count_nonzero(st[name]) > 0
        torch.testing.assert_close(st[name], expected[name], rtol=1e-5, atol=1e-7)


def test_straight_through_ov_restores_value_gradients(model, tokens):
    hook_name, captured = f"blocks.{LAYER}.attn.hook_z", {}
    def keep_grad(z, hook):  # returns a copy: a bridge's hook_z sees a reshaped view, what it returns is used
        z = z.clone()
        z.retain_grad()
        captured["z"] = z
        return z
    model.zero_grad(set_to_none=True)
    with freeze(model, [(LAYER, HEAD)], "ov", "zero", preserve_gradients=True):
        model.run_with_hooks(tokens, return_type="loss", fwd_hooks=[(hook_name, keep_grad)]).backward()
    params = _own_params(model, ("W_V", "b_V", "W_Q"))
    st = _head_grads(model, params)
    expected = _true_gradient_at(model, tokens, hook_name, 2, captured["z"].grad[:, :, HEAD], params)
    for name in params:
        assert torch.count_nonzero(st[name]) > 0
        torch.testing.assert_close(st[name], expected[name], rtol=1e-5, atol=1e-7)


def test_gradient_mode_spellings(mha_model):
    assert freeze(mha_model, [(0, 0)], preserve_gradients=True).spec.gradient.value == "straight_through"
    mha_model.reset_hooks()
    with pytest.raises(ValueError, match="contradicts"):
        freeze(mha_model, [(0, 0)], gradient="straight_through", preserve_gradients=False)


# ----- hook hygiene and TransformerLens entry points -------------------------------------------

def _hook_state(model):
    return {name: (list(hp.fwd_hooks), list(hp.bwd_hooks), dict(hp._forward_hooks))
            for name, hp in model.hook_dict.items()}


def _param_state(model):
    return {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}


def _assert_unchanged(model, hooks_before, params_before):
    assert _hook_state(model) == hooks_before
    after = _param_state(model)
    for name, (value, requires_grad) in params_before.items():
        assert torch.equal(after[name][0], value) and after[name][1] == requires_grad, name


def test_entry_points_agree(model, tokens):
    kwargs = dict(heads=[(LAYER, HEAD), (0, 2)], circuit="both", replacement="zero")
    with freeze(model, **kwargs):
        via_context = model(tokens)
        via_cache, _ = model.run_with_cache(tokens)
        via_hooks_inside = model.run_with_hooks(tokens, fwd_hooks=[])
    via_run_with_hooks = model.run_with_hooks(tokens, fwd_hooks=freeze_hooks(model, **kwargs))
    with model.hooks(fwd_hooks=freeze_hooks(model, **kwargs)):
        via_model_hooks = model(tokens)
    handle = freeze(model, **kwargs)
    via_handle = model(tokens)
    handle.remove()
    for other in (via_cache, via_hooks_inside, via_run_with_hooks, via_model_hooks, via_handle):
        assert torch.equal(via_context, other)
    assert not torch.equal(via_context, model(tokens))


def test_context_restores_model_on_exception(model, tokens):
    hooks_before, params_before = _hook_state(model), _param_state(model)
    clean = model(tokens)
    with pytest.raises(RuntimeError, match="boom"):
        with freeze(model, [(LAYER, HEAD)], "both", "noise"):
            model(tokens)
            raise RuntimeError("boom")
    _assert_unchanged(model, hooks_before, params_before)
    assert torch.equal(model(tokens), clean)


def test_handle_removal_keeps_user_hooks(model, tokens):
    seen = []
    user_hook = lambda act, hook: seen.append(hook.name)  # noqa: E731
    model.add_hook(f"blocks.{LAYER}.attn.hook_pattern", user_hook)
    try:
        hooks_before, params_before = _hook_state(model), _param_state(model)
        handle = freeze(model, [(LAYER, HEAD)], "qk", "zero")
        handle.remove()
        handle.remove()  # idempotent
        _assert_unchanged(model, hooks_before, params_before)
        model(tokens)
        assert seen == [f"blocks.{LAYER}.attn.hook_pattern"]
    finally:
        model.reset_hooks()


@pytest.mark.parametrize("user_first", [True, False])
def test_composes_with_user_hooks_in_both_orders(model, tokens, user_first):
    """User hook doubles every head's z; OV-ZERO on one head. Either order gives the hand-composed result."""
    z_name = f"blocks.{LAYER}.attn.hook_z"
    def double(z, hook):
        return 2 * z
    def by_hand(z, hook):
        z = 2 * z
        z[:, :, HEAD] = 0
        return z
    expected = model.run_with_hooks(tokens, fwd_hooks=[(z_name, by_hand)])
    if user_first:
        with model.hooks(fwd_hooks=[(z_name, double)]), freeze(model, [(LAYER, HEAD)], "ov", "zero"):
            got = model(tokens)
    else:
        with freeze(model, [(LAYER, HEAD)], "ov", "zero"), model.hooks(fwd_hooks=[(z_name, double)]):
            got = model(tokens)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    fresh = builders.under_test("mha" if model_spec(model).n_kv_heads == 4 else "gqa")
    assert _hook_state(model) == _hook_state(fresh)


def test_deep_copy_frozen_independently(tokens):
    # a fresh model: a TL 4 bridge keeps its last attention pattern (a non-leaf tensor) after a forward with
    # grad, and such a bridge cannot be deep-copied (a TransformerLens limitation, not a freeze)
    mha_model = builders.mha_under_test()
    copy_model = copy.deepcopy(mha_model)
    clean = mha_model(tokens)
    with freeze(copy_model, [(LAYER, HEAD)], "qk", "zero"):
        assert torch.equal(mha_model(tokens), clean)
        assert not torch.equal(copy_model(tokens), clean)
    assert torch.equal(copy_model(tokens), clean)


def test_model_unchanged_after_backward_through_freeze(mha_model, tokens):
    hooks_before, params_before = _hook_state(mha_model), _param_state(mha_model)
    _grads(mha_model, tokens, circuit="both", replacement="zero", gradient="straight_through")
    _assert_unchanged(mha_model, hooks_before, params_before)


# ----- head sets and bad input -----------------------------------------------------------------

def test_head_forms_agree(mha_model):
    spec = model_spec(mha_model)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, 1] = mask[1, 3] = mask[1, 0] = True
    expected = ((0, 1), (1, 0), (1, 3))
    assert normalize_heads(spec, [(1, 3), (0, 1), (1, 0), (1, 3)]) == expected
    assert normalize_heads(spec, mask) == expected
    assert normalize_heads(spec, {0: [1], 1: [0, 3]}) == expected
    assert normalize_heads(spec, [[1], [0, 3]]) == expected
    assert normalize_heads(spec, (1, 3)) == ((1, 3),)


def test_bad_input(mha_model, tokens):
    m = mha_model
    with pytest.raises(IndexError, match="layer 5 out of range"):
        freeze(m, [(5, 0)])
    with pytest.raises(IndexError, match="head 4 out of range"):
        freeze(m, [(0, 4)])
    with pytest.raises(ValueError, match="empty head set"):
        freeze(m, [])
    with pytest.raises(ValueError, match="empty head set"):
        freeze(m, torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="shape"):
        freeze(m, torch.zeros(3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="per-layer"):
        freeze(m, [[0], [1], [2]])
    with pytest.raises(ValueError, match="unknown replacement"):
        freeze(m, [(0, 0)], "qk", "shuffle")
    with pytest.raises(ValueError, match="unknown circuit"):
        freeze(m, [(0, 0)], "vo")
    with pytest.raises(TypeError, match="HookedTransformer"):
        freeze(torch.nn.Linear(3, 3), [(0, 0)])
    with pytest.raises(ValueError, match="vocabulary"):
        freeze(m, [(0, 0)], "qk", "resample", reference=torch.full((3, 12), 10_000))
    with pytest.raises(ValueError, match=r"shape \[batch, pos\]"):
        freeze(m, [(0, 0)], "qk", "resample", reference=torch.zeros(12, dtype=torch.long))
    with pytest.raises(ValueError, match="n_ctx"):
        freeze(m, [(0, 0)], "ov", "mean", reference=torch.zeros(2, 99, dtype=torch.long))
    with pytest.raises(ValueError, match="RESAMPLE needs"):
        freeze(m, [(0, 0)], "qk", "resample")
    with pytest.raises(ValueError, match="takes no reference"):
        freeze(m, [(0, 0)], "qk", "zero", reference=tokens)
    with pytest.raises(ValueError, match="noise_scale"):
        freeze(m, [(0, 0)], "qk", "noise", noise_scale=-1.0)
    # reference of another batch size: a clear error at run time, and the hooks are still removed
    hooks_before = _hook_state(m)
    with pytest.raises(ValueError, match="batch size"):
        with freeze(m, [(0, 0)], "ov", "resample", reference=builders.random_tokens(5, 12)):
            m(tokens)
    assert _hook_state(m) == hooks_before
    short_means = compute_mean_activations(m, builders.random_tokens(4, 5), progress=False)
    with pytest.raises(ValueError, match="positions"):
        with freeze(m, [(0, 0)], "ov", "mean", reference=short_means):
            m(tokens)
    assert _hook_state(m) == hooks_before
