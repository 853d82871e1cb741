"""Fixtures of the command tests: a tiny model saved as a local checkpoint with task files, and its report."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests import builders
from tests.cli.helpers import SMALL, write_ids
from tl_circuits import InterferenceConfig, compute_interference
from tl_circuits.cli.command import main
from tl_circuits.models.checkpoint import save_checkpoint


def checkpoint_under_test(directory, seed: int):
    """The model under test as a local checkpoint (tl_circuits.models.checkpoint's format) and that model.

    TL < 4: builders.mha saved by save_checkpoint (the HookedTransformer itself is returned). TL 4, which has no
    HookedTransformer to save: the same format written by hand (HookedTransformerConfig arguments in config.json,
    random parameters under HookedTransformer names in model.safetensors; MHA, LayerNorm, learned positions,
    non-zero biases), and the model is the checkpoint loaded back (a native TransformerBridge), as the command
    loads it."""
    if builders.HAS_HOOKED_TRANSFORMER:
        model = builders.mha(seed=seed)
        save_checkpoint(model, directory)
        return model
    import json

    from safetensors.torch import save_file

    from tl_circuits.models.checkpoint import load_checkpoint

    n_layers, d_model, n_heads, d_head, d_mlp, n_ctx, d_vocab = 2, 32, 4, 8, 64, builders.N_CTX, builders.D_VOCAB
    config = dict(n_layers=n_layers, d_model=d_model, n_heads=n_heads, d_head=d_head, d_mlp=d_mlp, n_ctx=n_ctx,
                  d_vocab=d_vocab, act_fn="gelu", normalization_type="LN", positional_embedding_type="standard",
                  dtype="float32")
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape, std=0.3: std * torch.randn(*shape, generator=gen)  # noqa: E731
    state = {"embed.W_E": randn(d_vocab, d_model), "pos_embed.W_pos": randn(n_ctx, d_model),
             "ln_final.w": 1 + randn(d_model, std=0.1), "ln_final.b": randn(d_model, std=0.1),
             "unembed.W_U": randn(d_model, d_vocab), "unembed.b_U": randn(d_vocab, std=0.1)}
    for layer in range(n_layers):
        pre = f"blocks.{layer}."
        for name in ("ln1", "ln2"):
            state[pre + name + ".w"], state[pre + name + ".b"] = 1 + randn(d_model, std=0.1), randn(d_model, std=0.1)
        for letter in "QKV":
            state[pre + f"attn.W_{letter}"] = randn(n_heads, d_model, d_head)
            state[pre + f"attn.b_{letter}"] = randn(n_heads, d_head, std=0.1)
        state[pre + "attn.W_O"], state[pre + "attn.b_O"] = randn(n_heads, d_head, d_model), randn(d_model, std=0.1)
        state[pre + "mlp.W_in"], state[pre + "mlp.b_in"] = randn(d_model, d_mlp), randn(d_mlp, std=0.1)
        state[pre + "mlp.W_out"], state[pre + "mlp.b_out"] = randn(d_mlp, d_model), randn(d_model, std=0.1)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    return load_checkpoint(directory)


@pytest.fixture(scope="session")
def checkpoint_inputs(tmp_path_factory):
    """A tiny model saved as a local checkpoint, task A as a ragged .tokens file, task B as a .npy array."""
    root = tmp_path_factory.mktemp("inputs")
    model = checkpoint_under_test(root / "model", seed=3)
    gen = torch.Generator().manual_seed(5)
    rows_a = [torch.randint(0, 25, (int(n),), generator=gen).tolist() for n in (9, 5, 12, 7, 10, 6)]
    rows_b = torch.randint(25, builders.D_VOCAB, (5, 11), generator=gen)
    write_ids(root / "a.tokens", [[]] + rows_a[:3] + [[]] + rows_a[3:])  # blank lines are skipped
    np.save(root / "b.npy", rows_b.numpy())
    return dict(root=root, model=model, rows_a=rows_a, tokens_b=rows_b)


@pytest.fixture(scope="session")
def checkpoint_report(checkpoint_inputs, tmp_path_factory):
    """(exit status, stdout, stderr, report folder) of a quiet run on the local checkpoint and token files."""
    import contextlib
    import io

    root = checkpoint_inputs["root"]
    out = tmp_path_factory.mktemp("checkpoint") / "report"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        status = main([str(a) for a in ["--model", root / "model", "--task-a", root / "a.tokens", "--task-b",
                                        root / "b.npy", "--n-a", "5", *SMALL, "--out", out]])
    return status, stdout.getvalue(), stderr.getvalue(), out


@pytest.fixture(scope="session")
def bundled_report(tmp_path_factory):
    """The no-argument job, at small sizes, in process (and the inputs it used, rebuilt independently)."""
    from tl_circuits.bundled.models import DEFAULT_BUNDLED_MODEL, bundled_tasks, load_bundled_model

    out = tmp_path_factory.mktemp("bundled") / "report"
    assert main(["--n-a", "6", "--n-b", "5", "--seed", "3", *SMALL, "--out", str(out)]) == 0
    model = load_bundled_model(DEFAULT_BUNDLED_MODEL, "cpu")
    make_a, make_b = list(bundled_tasks(DEFAULT_BUNDLED_MODEL).values())[:2]
    batch_a, batch_b = make_a(6, 3), make_b(5, 4)  # seeds: --seed, --seed + 1
    direct = compute_interference(  # what the report's map must equal: the signed variant on the pooled Fisher
        model, batch_a.tokens, batch_b.tokens, attention_mask_a=batch_a.attention_mask,
        attention_mask_b=batch_b.attention_mask, ids_a=[f"{batch_a.name}#{i}" for i in range(6)],
        ids_b=[f"{batch_b.name}#{j}" for j in range(5)],
        config=InterferenceConfig(variant="signed", fisher_source="pooled"), progress=False)
    return dict(out=out, model=model, batch_a=batch_a, batch_b=batch_b, interference=direct)
