"""``--model DIR``: a local Hugging Face ``save_pretrained`` directory (GPT-2 with tied embeddings, LLaMA with GQA)
loads offline, with logits equal to the HF model's own; it is told apart from a tl_circuits checkpoint by what its
config.json holds; a directory that is neither says what was expected; ``--dtype`` loads the parameters in that
dtype while gradients, Fisher and scores stay float32 or better."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from tests import builders
from tests.cli.conftest import checkpoint_under_test
from tests.cli.helpers import word_tokenizer
from tl_circuits.cli.loading import CommandError, load_model
from tl_circuits.models.model_dir import CheckpointError, load_checkpoint
from tl_circuits.models.hf_directory import HF, TL_CIRCUITS, directory_kind

TOKENS = torch.tensor([[0, 3, 4, 6, 7, 3, 8, 9], [0, 11, 12, 14, 16, 17, 5, 10]])  # word tokenizer ids


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Each architecture saved by save_pretrained with the word tokenizer (the GPT-2 also without the n_ctx field a
    hub GPT-2 config has), and the saved HF models."""
    root = tmp_path_factory.mktemp("hf")
    tokenizer, _ = word_tokenizer()
    models = {name: builders.save_hf_directory(root / name, name, tokenizer, seed=seed)
              for seed, name in enumerate(("gpt2", "llama"))}
    models["gpt2_minimal"] = builders.save_hf_directory(root / "gpt2_minimal", "gpt2", tokenizer, seed=0,
                                                        hub_fields=False)
    return root, models


def hf_logits(directory, tokens, dtype=torch.float32):
    """The HF model's own logits, read back from the directory by transformers (the independent reference)."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(directory), local_files_only=True, dtype=dtype).eval()
    with torch.no_grad():
        return hf(tokens).logits.float()


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
@pytest.mark.parametrize("bridge", [False, True])
def test_hf_directories_load_with_the_hf_models_logits(architecture, bridge, hf_dirs):
    root, _ = hf_dirs
    loaded = load_model(str(root / architecture), "cpu", bridge=bridge)
    expected_class = "HookedTransformer" if builders.HAS_HOOKED_TRANSFORMER and not bridge else "TransformerBridge"
    assert type(loaded.model).__name__ == expected_class and loaded.notes == []
    assert loaded.source == "hugging_face" and loaded.name == architecture
    assert loaded.info()["n_kv_heads"] == (2 if architecture == "llama" else 4)
    with torch.no_grad():
        logits = loaded.model(TOKENS).float()
    torch.testing.assert_close(logits, hf_logits(root / architecture, TOKENS), rtol=1e-5, atol=1e-5)
    assert loaded.model.to_tokens("the cat sat").tolist() == [[0, 3, 4, 6]]  # its tokenizer, BOS prepended


@pytest.mark.needs_hooked_transformer  # the conversion to a HookedTransformer is TransformerLens 3's
def test_a_directory_transformer_lens_cannot_convert_loads_as_a_bridge_with_a_note(hf_dirs):
    """TransformerLens 3.9's GPT-2 conversion reads config.n_ctx, which a hub GPT-2 config has and a
    save_pretrained of a fresh GPT2Config does not: the directory is read as a bridge instead, and the note says
    why."""
    root, _ = hf_dirs
    loaded = load_model(str(root / "gpt2_minimal"), "cpu")
    assert type(loaded.model).__name__ == "TransformerBridge"
    assert len(loaded.notes) == 1 and "could not convert GPT2LMHeadModel" in loaded.notes[0] and "n_ctx" in \
        loaded.notes[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(TOKENS).float(), hf_logits(root / "gpt2_minimal", TOKENS),
                                   rtol=1e-5, atol=1e-5)


def test_directories_are_told_apart_by_their_config_not_their_file_names(hf_dirs, tmp_path):
    root, _ = hf_dirs
    checkpoint_under_test(tmp_path / "ours", seed=1)  # config.json + model.safetensors, as an HF directory has
    assert sorted(p.name for p in (tmp_path / "ours").iterdir())[:2] == ["config.json", "model.safetensors"]
    assert directory_kind(root / "gpt2") == HF and directory_kind(tmp_path / "ours") == TL_CIRCUITS
    assert load_model(str(tmp_path / "ours"), "cpu").source == "checkpoint"
    # an HF config may use d_model/n_layers (MPT does): architectures/model_type decide
    (tmp_path / "mpt").mkdir()
    (tmp_path / "mpt" / "config.json").write_text(json.dumps({"model_type": "mpt", "d_model": 8, "n_layers": 1}))
    assert directory_kind(tmp_path / "mpt") == HF
    with pytest.raises(CheckpointError, match="a Hugging Face model directory"):
        load_checkpoint(root / "llama")


def test_neither_format_says_what_was_expected(hf_dirs, tmp_path):
    root, _ = hf_dirs
    (tmp_path / "empty").mkdir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"hidden": 8}))
    for folder in ("empty", "other"):
        with pytest.raises(CommandError, match=r"not a model directory: expected a Hugging Face model directory "
                                               r"\(config.json naming 'architectures' or 'model_type'.*or a "
                                               r"tl_circuits checkpoint"):
            load_model(str(tmp_path / folder), "cpu")
    shutil.copytree(root / "llama", tmp_path / "no_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "no_tokenizer" / name).unlink()
    with pytest.raises(CommandError, match="no_tokenizer: a Hugging Face model without a tokenizer"):
        load_model(str(tmp_path / "no_tokenizer"), "cpu")
    shutil.copytree(root / "llama", tmp_path / "no_weights")
    (tmp_path / "no_weights" / "model.safetensors").unlink()
    with pytest.raises(CommandError, match="no_weights: a Hugging Face config.json but no weights"):
        load_model(str(tmp_path / "no_weights"), "cpu")


@pytest.mark.parametrize("architecture", ["gpt2", "llama"])
def test_dtype_loads_the_parameters_in_it_and_gradients_stay_float32(architecture, hf_dirs):
    """bfloat16 parameters; logits within bfloat16 rounding of the float32 HF model's; per-sample gradient rows
    float32, the Fisher float64, and the interference map close to the float32 model's."""
    from tl_circuits import GradientConfig, InterferenceConfig, compute_interference, per_sample_gradients

    root, _ = hf_dirs
    half = load_model(str(root / architecture), "cpu", dtype=torch.bfloat16)
    full = load_model(str(root / architecture), "cpu")
    assert {p.dtype for p in half.model.parameters()} == {torch.bfloat16} and half.info()["dtype"] == "bfloat16"
    with torch.no_grad():
        logits = half.model(TOKENS).float()
    reference = hf_logits(root / architecture, TOKENS)
    assert float((logits - reference).abs().max()) < 0.05 * float(reference.abs().max())
    grads = per_sample_gradients(half.model, TOKENS, config=GradientConfig(progress=False))
    assert {g.dtype for g in grads.per_block.values()} == {torch.float32}
    config = InterferenceConfig(gradients=GradientConfig(progress=False), variant="signed", fisher_source="pooled")
    a, b = TOKENS, TOKENS.flip(1)
    ours = compute_interference(half.model, a, b, config=config)
    theirs = compute_interference(full.model, a, b, config=config)
    assert {f.dtype for f in ours.fisher.per_block.values()} == {torch.float64}
    for block in "QKVO":
        assert ours.scores[block].dtype == torch.float32
        mean, expected = ours.mean[block].flatten(), theirs.mean[block].flatten()
        assert torch.corrcoef(torch.stack([mean, expected]))[0, 1] > 0.95, block


def test_dtype_applies_to_bundled_models_too():
    loaded = load_model(None, "cpu", dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}
