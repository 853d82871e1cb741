"""The bundled models and local checkpoints as TransformerLens-native bridges (``as_bridge=True``; the default
under TransformerLens 4.x), against independent references: the HookedTransformer on the same weights (3.x),
TransformerLens's own ``convert_tl_checkpoint`` (4.x), and the freeze effects recorded in the models' JSON when
they were analysed as HookedTransformers (both)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import tl_circuits as tlc
from tests import builders
from tests.builders import HAS_HOOKED_TRANSFORMER
from tl_circuits.models.model_dir import CheckpointError, load_checkpoint, save_checkpoint
from tl_circuits.models.spec import model_spec
from tl_circuits.models.native import _port_convert, native_bridge_from_tl
from tl_circuits.bundled.tasks import in_context_accuracy, in_context_loss, scored_loss_metric

MODEL_NAMES = [info.name for info in tlc.bundled.list_bundled_models()]
DEFAULT = tlc.bundled.DEFAULT_BUNDLED_MODEL

_bridges: dict = {}


def bridge_named(name: str):
    if name not in _bridges:
        _bridges[name] = tlc.load_bundled_model(name, as_bridge=True)
    return _bridges[name]


def test_as_bridge_gives_a_native_bridge_and_the_default_follows_transformer_lens():
    from transformer_lens.model_bridge import TransformerBridge

    bridge = bridge_named(DEFAULT)
    assert isinstance(bridge, TransformerBridge) and not bridge.training and model_spec(bridge).kind == "bridge"
    assert bridge.to_str_tokens(torch.tensor([0, 5, 17]))[1:] == ["5", "17"]  # the task tokenizer is attached
    default = tlc.load_bundled_model(DEFAULT)
    assert isinstance(default, TransformerBridge) != HAS_HOOKED_TRANSFORMER


@pytest.mark.needs_hooked_transformer  # compares with the bundled model loaded as a HookedTransformer
@pytest.mark.parametrize("name", MODEL_NAMES)
def test_bridge_logits_equal_the_hooked_transformer(name):
    model, bridge = tlc.load_bundled_model(name, as_bridge=False), bridge_named(name)
    for task, make in tlc.bundled.bundled_tasks(name).items():
        tokens = make(8, seed=5).tokens
        assert torch.equal(bridge(tokens), model(tokens)), task


def test_converter_port_equals_transformer_lens_converter():
    """Under 4.x the loader uses TransformerLens's convert_tl_checkpoint; under 3.x (which lacks it) a port."""
    pytest.importorskip("transformer_lens.utilities.tl_checkpoint_conversion")
    from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint

    bridge = bridge_named(DEFAULT)
    state = load_file(str(tlc.bundled.bundled_model_info(DEFAULT).weights_path))
    ours, theirs = _port_convert(state, bridge.cfg), convert_tl_checkpoint(state, bridge.cfg)
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("task", tlc.bundled.bundled_model_info(DEFAULT).tasks)
def test_bridge_reproduces_the_recorded_metrics_and_freeze_effects(task):
    """The JSON's numbers were measured on the HookedTransformer (held-out batch: n=64, seed 0, rounded to 1e-4):
    the bridge's loss, accuracy and per-head ZERO freeze effects match them, head by head."""
    info, bridge = tlc.bundled.bundled_model_info(DEFAULT), bridge_named(DEFAULT)
    batch = tlc.bundled.bundled_tasks(DEFAULT)[task](64, seed=0)
    assert float(in_context_loss(bridge, batch)) == pytest.approx(info.metrics[task]["loss"], abs=1e-4)
    assert in_context_accuracy(bridge, batch) == pytest.approx(info.metrics[task]["accuracy"], abs=1e-4)
    qk = model_spec(bridge).qk_mask_source is not None  # False: a native bridge on TransformerLens 3.x
    circuits = ("qk", "ov") if qk else ("ov",)
    sweep = tlc.freeze_sweep(bridge, batch.tokens, scored_loss_metric(batch), circuits=circuits, progress=False)
    for circuit in circuits:
        recorded = np.array(info.metadata["freeze_effects"][task]["zero"][circuit])
        np.testing.assert_allclose(sweep.effect[circuit].numpy(), recorded, atol=2e-4, err_msg=circuit)
    assert qk or HAS_HOOKED_TRANSFORMER  # only 3.x native bridges refuse QK freezes


def test_freezing_the_induction_heads_ov_destroys_copying_on_the_bridge():
    """The known-circuit result on the bridge, on every TransformerLens (thresholds of tests/bundled/test_bundled.py);
    QK freezes are refused with one clear error where the native bridge discards pattern edits (3.x)."""
    info, bridge = tlc.bundled.bundled_model_info(DEFAULT), bridge_named(DEFAULT)
    batch = tlc.bundled.bundled_tasks(DEFAULT)["induction"](32, seed=123)
    clean = float(in_context_loss(bridge, batch))
    with tlc.freeze(bridge, info.known_heads["induction"], "ov", "zero"):
        assert float(in_context_loss(bridge, batch)) > clean + 2.0 and in_context_accuracy(bridge, batch) < 0.5
    with tlc.freeze(bridge, info.control_heads, "ov", "zero"):
        assert abs(float(in_context_loss(bridge, batch)) - clean) < 0.25
    if model_spec(bridge).qk_mask_source is None:
        with pytest.raises(NotImplementedError, match="native TransformerBridge before TransformerLens 4"):
            tlc.freeze(bridge, info.known_heads["induction"], "qk", "zero")
    assert float(in_context_loss(bridge, batch)) == clean  # unchanged after the freezes


def test_checkpoint_loads_as_a_bridge(tmp_path):
    """A checkpoint directory (here: the bundled files, as save_checkpoint lays them out) loads as the same bridge."""
    info = tlc.bundled.bundled_model_info(DEFAULT)
    (tmp_path / "config.json").write_text(json.dumps(info.config))
    shutil.copy(info.weights_path, tmp_path / "model.safetensors")
    loaded = load_checkpoint(tmp_path, as_bridge=True)
    tokens = tlc.bundled.bundled_tasks(DEFAULT)["induction"](4, seed=1).tokens
    assert torch.equal(loaded(tokens), bridge_named(DEFAULT)(tokens)) and loaded.tokenizer is None
    assert type(load_checkpoint(tmp_path)).__name__ == ("HookedTransformer" if HAS_HOOKED_TRANSFORMER else
                                                        "TransformerBridge")


@pytest.mark.needs_hooked_transformer  # saves a HookedTransformer checkpoint (save_checkpoint)
def test_saved_hooked_transformer_with_mlp_loads_as_an_equal_bridge(tmp_path):
    """A model with an MLP and non-zero biases (LayerNorm, learned positions): saved, loaded as a bridge, same
    logits."""
    model = builders.mha(seed=4)
    save_checkpoint(model, tmp_path)
    tokens = builders.random_tokens()
    torch.testing.assert_close(load_checkpoint(tmp_path, as_bridge=True)(tokens), model(tokens), rtol=1e-5, atol=1e-5)


def test_unsupported_configurations_are_one_clear_error(tmp_path):
    info = tlc.bundled.bundled_model_info(DEFAULT)
    state = load_file(str(info.weights_path))
    with pytest.raises(NotImplementedError, match="positional_embedding_type='standard'"):
        native_bridge_from_tl({**info.config, "positional_embedding_type": "rotary"}, state)
    with pytest.raises(NotImplementedError, match="use_local_attn=True"):
        native_bridge_from_tl({**info.config, "use_local_attn": True}, state)
    with pytest.raises(RuntimeError, match="do not fit the config"):
        native_bridge_from_tl({**info.config, "d_head": 8, "n_heads": 8}, state)
    (tmp_path / "config.json").write_text(json.dumps({**info.config, "positional_embedding_type": "shortformer"}))
    shutil.copy(info.weights_path, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="cannot load as a TransformerBridge.*learned positions"):
        load_checkpoint(tmp_path, as_bridge=True)
    with pytest.raises(TypeError, match="save_checkpoint writes a HookedTransformer, got TransformerBridge"):
        save_checkpoint(bridge_named(DEFAULT), tmp_path / "out")
