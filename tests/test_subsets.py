"""Layer and head subsets (issue #25 §1, docs/spec.md §0.7): the selected cells equal the full run's, bit for bit,
everything else is NaN, the families hold the selected cells only, and results keep the selection when saved."""

from __future__ import annotations

import warnings

import pytest
import torch
from scipy.stats import false_discovery_control

from tests.builders import gpt2_bridge, llama_bridge, random_tokens, under_test
from tl_circuits import load
from tl_circuits.defaults import default_n_permutations
from tl_circuits.freezing.sweep import freeze_sweep
from tl_circuits.interference.config import GradientConfig, InterferenceConfig
from tl_circuits.interference.engine import compute_interference, pooled_scores
from tl_circuits.models.spec import model_spec
from tl_circuits.selection import format_indices, parse_indices, resolve_selection

MODELS = {"mha": lambda: under_test("mha"), "gqa": lambda: under_test("gqa"),
          "gpt2_bridge": lambda: gpt2_bridge(0, n_layers=3), "llama_bridge": lambda: llama_bridge(0)}


def _cells(model, layers, heads):
    spec = model_spec(model)
    return resolve_selection(spec, layers, heads).cells(spec)


def _last_layer(model) -> list[int]:
    return [model_spec(model).n_layers - 1]


def test_notation_round_trips_and_bad_selections_are_named():
    assert parse_indices("0,3-5") == (0, 3, 4, 5) and parse_indices(" 2 , 2,1") == (1, 2)
    for values in ([0], [1, 2, 3], [0, 2, 3, 7], list(range(12))):
        assert parse_indices(format_indices(values)) == tuple(values)
    spec = model_spec(under_test("gqa"))
    with pytest.raises(ValueError, match="runs backwards"):
        parse_indices("5-3")
    with pytest.raises(ValueError, match="not an integer"):
        parse_indices("1,x")
    with pytest.raises(IndexError, match="layers \\[7\\] out of range"):
        resolve_selection(spec, layers=[7])
    with pytest.raises(ValueError, match="heads is empty"):
        resolve_selection(spec, heads=[])
    with pytest.raises(TypeError, match="layers must hold ints"):
        resolve_selection(spec, layers=[True])


def test_gqa_heads_keep_the_kv_heads_they_read():
    spec = model_spec(under_test("gqa"))  # 4 query heads over 2 KV heads
    cells = resolve_selection(spec, layers=[1], heads=[1, 3]).cells(spec)
    assert cells["Q"][1].tolist() == [False, True, False, True] and not cells["Q"][0].any()
    assert cells["K"][1].tolist() == [True, True] and cells["V"][1].tolist() == [True, True]
    assert resolve_selection(spec, heads=[2, 3]).cells(spec)["K"][0].tolist() == [False, True]


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("replacement", ["zero", "noise", "resample"])
def test_sweep_selected_cells_equal_the_full_sweep(name, replacement):
    model = MODELS[name]()
    tokens, other = random_tokens(3, 8, seed=1), random_tokens(3, 8, seed=2)
    kw = dict(per_sample=True, progress=False, replacement=replacement, circuits=("qk", "ov"),
              reference=other if replacement == "resample" else None)
    full = freeze_sweep(model, tokens, **kw)
    heads = None if replacement == "noise" else [0, 2]  # NOISE is drawn per stacked pass: layers only (§0.7)
    layers = _last_layer(model)
    sub = freeze_sweep(model, tokens, layers=layers, heads=heads, **kw)
    selected = _cells(model, layers, heads)["Q"]
    for circuit in ("qk", "ov"):
        assert torch.equal(sub.per_sample_effect[circuit][:, selected], full.per_sample_effect[circuit][:, selected])
        assert sub.per_sample_effect[circuit][:, ~selected].isnan().all()
        assert sub.frozen[circuit].shape == full.frozen[circuit].shape and sub.frozen[circuit][~selected].isnan().all()
    assert sub.settings["selection"] == {"layers": layers, "heads": heads or list(range(model_spec(model).n_heads))}
    assert "selection" not in full.settings


@pytest.mark.parametrize("name", list(MODELS))
def test_interference_selected_cells_equal_the_full_run(name):
    model = MODELS[name]()
    tokens_a, tokens_b = random_tokens(3, 8, seed=3), random_tokens(2, 8, seed=4)
    config = InterferenceConfig(gradients=GradientConfig(progress=False), leave_one_out=True)
    full = compute_interference(model, tokens_a, tokens_b, config=config)
    layers, heads = _last_layer(model), [1, 3]
    sub = compute_interference(model, tokens_a, tokens_b, layers=layers, heads=heads, config=config)
    for block, selected in _cells(model, layers, heads).items():
        assert sub.scores[block].shape == full.scores[block].shape
        assert torch.equal(sub.scores[block][:, :, selected], full.scores[block][:, :, selected]), block
        assert sub.scores[block][:, :, ~selected].isnan().all(), block
        assert torch.equal(sub.fisher.per_block[block][selected], full.fisher.per_block[block][selected])
        assert sub.fisher.per_block[block][~selected].isnan().all()
    # an external Fisher: the caller's, whole, and the same selected scores
    plain = config.replace(leave_one_out=False)
    external = compute_interference(model, tokens_a, tokens_b, layers=layers, fisher=full.fisher, config=plain)
    assert external.fisher is full.fisher
    again = compute_interference(model, tokens_a, tokens_b, fisher=full.fisher, config=plain)
    assert torch.equal(external.scores["O"][:, :, layers], again.scores["O"][:, :, layers])


def test_interference_of_the_first_layer_and_a_gap():
    model = gpt2_bridge(0, n_layers=3)
    tokens_a, tokens_b = random_tokens(2, 8, seed=5), random_tokens(2, 8, seed=6)
    full = compute_interference(model, tokens_a, tokens_b, progress=False)
    sub = compute_interference(model, tokens_a, tokens_b, layers="0,2", progress=False)
    assert torch.equal(sub.scores["V"][:, :, [0, 2]], full.scores["V"][:, :, [0, 2]])
    assert sub.scores["V"][:, :, 1].isnan().all()


def test_a_subset_run_leaves_the_model_as_it_was():
    model = gpt2_bridge(0, n_layers=3)
    before = {name: (p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()}
    compute_interference(model, random_tokens(2, 8), random_tokens(2, 8, seed=1), layers=[2], progress=False)
    assert all(torch.equal(before[name][0], p) and before[name][1] == p.requires_grad and p.grad is None
               for name, p in model.named_parameters())
    assert all(not hp._forward_hooks for hp in model.hook_dict.values())  # the cut at layer 2's resid_pre is gone


@pytest.mark.parametrize("name", ["gqa", "llama_bridge"])
def test_the_tests_families_hold_the_selected_cells_only(name):
    model = MODELS[name]()
    tokens_a, tokens_b = random_tokens(4, 8, seed=7), random_tokens(4, 8, seed=8)
    layers, heads = _last_layer(model), [0, 1]
    full = pooled_scores(model, tokens_a, tokens_b, progress=False)
    sub = pooled_scores(model, tokens_a, tokens_b, layers=layers, heads=heads, progress=False)
    cells = _cells(model, layers, heads)
    for block, selected in cells.items():
        assert torch.equal(sub.scores[block][:, :, selected], full.scores[block][:, :, selected])
    kw = dict(n_permutations=199, n_bootstrap=0, seed=0, progress=False)
    test_full, test_sub = full.permutation_test(**kw), sub.permutation_test(**kw)
    selected_p = torch.cat([test_full.p_value[b][cells[b]] for b in cells])
    assert torch.equal(torch.cat([test_sub.p_value[b][cells[b]] for b in cells]), selected_p)
    q_sub = torch.cat([test_sub.q_value_bh[b][cells[b]] for b in cells])  # BH over the selected cells, by scipy
    torch.testing.assert_close(q_sub, torch.from_numpy(false_discovery_control(selected_p.numpy())))
    assert all(test_sub.q_value_bh[b][~cells[b]].isnan().all() for b in cells)
    with warnings.catch_warnings():  # unselected cells are not "non-finite cells dropped from the family"
        warnings.simplefilter("error", RuntimeWarning)
        sub.permutation_test(**kw)
    default = sub.permutation_test(n_bootstrap=0, seed=0, progress=False, alpha=0.001)
    m = sum(int(c.sum()) for c in cells.values())
    assert default.n_permutations == default_n_permutations(m, 0.001) != default_n_permutations(
        sum(c.numel() for c in cells.values()), 0.001)
    conflict = sub.conflict_test()
    assert all(conflict.p_value[b][~cells[b]].isnan().all() for b in cells)


def test_results_keep_their_selection_when_saved(tmp_path):
    model = under_test("gqa")
    tokens_a, tokens_b = random_tokens(2, 8, seed=9), random_tokens(2, 8, seed=10)
    result = compute_interference(model, tokens_a, tokens_b, layers=[1], heads=[3], progress=False)
    loaded = load(result.save(tmp_path / "interference"))
    assert loaded.settings["selection"] == {"layers": [1], "heads": [3]}
    assert all(torch.equal(loaded.scores[b].isnan(), result.scores[b].isnan()) for b in result.scores)
    sweep = freeze_sweep(model, tokens_a, layers=[1], heads=[3], progress=False)
    loaded_sweep = load(sweep.save(tmp_path / "sweep"))
    assert loaded_sweep.settings["selection"] == {"layers": [1], "heads": [3]}
    assert torch.equal(loaded_sweep.frozen["qk"].isnan(), sweep.frozen["qk"].isnan())


def test_end_to_end_tests_take_the_selection():
    from tl_circuits.stats.conflict import interference_conflict_test
    from tl_circuits.stats.interference_tests import interference_permutation_test

    model = under_test("gqa")
    tokens_a, tokens_b = random_tokens(3, 8, seed=11), random_tokens(3, 8, seed=12)
    cells = _cells(model, [1], [2])
    test = interference_permutation_test(model, tokens_a, tokens_b, layers=[1], heads=[2], n_permutations=99,
                                         n_bootstrap=0, seed=0, progress=False)
    pooled = pooled_scores(model, tokens_a, tokens_b, layers=[1], heads=[2], progress=False)
    direct = pooled.permutation_test(n_permutations=99, n_bootstrap=0, seed=0, progress=False)
    conflict = interference_conflict_test(model, tokens_a, tokens_b, layers=[1], heads=[2], progress=False)
    for block, selected in cells.items():
        assert torch.equal(test.p_value[block].isnan(), ~selected)
        assert torch.equal(test.p_value[block][selected], direct.p_value[block][selected])
        assert conflict.p_value[block][~selected].isnan().all() and conflict.p_value[block][selected].isfinite().all()
