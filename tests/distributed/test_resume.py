"""Resume: a run interrupted after k finished shards, started again with the same settings, computes only the
missing shards and gives the result of an uninterrupted run; a run with other settings reuses nothing."""

from __future__ import annotations

import re

import pytest
import torch

from tests import builders
from tests.distributed.scenarios import config, tasks
from tl_circuits import compute_interference
from tl_circuits.interference import checkpoint, chunk_engines



class Interrupted(Exception):
    pass


@pytest.fixture
def forwarded(monkeypatch):
    """Samples run through the factored engine's forward/backward (a one-item list)."""
    real, count = chunk_engines._factor_chunk, [0]

    def counted(model, spec, tokens, *rest):
        count[0] += tokens.shape[0]
        return real(model, spec, tokens, *rest)

    monkeypatch.setattr(chunk_engines, "_factor_chunk", counted)
    return count


def interrupt_after(monkeypatch, k: int) -> None:
    """Shard saves fail after the k-th: the run stops with k shards on disk."""
    real, saved = checkpoint.ShardCheckpoint.save, [0]

    def save(self, arrays, samples, bad):
        if saved[0] == k:
            raise Interrupted(f"stopped after {k} shards")
        real(self, arrays, samples, bad)
        saved[0] += 1

    monkeypatch.setattr(checkpoint.ShardCheckpoint, "save", save)


def test_an_interrupted_run_resumes_without_recomputing(tmp_path, monkeypatch, forwarded):
    # 5 + 3 samples in shards of 2: [0:2], [2:4], [4:5] and [0:2], [2:3]
    model, (a, b) = builders.gqa_under_test(), tasks()
    reference = compute_interference(model, a, b, config=config())
    with monkeypatch.context() as patch:
        interrupt_after(patch, 3)
        with pytest.raises(Interrupted):
            compute_interference(model, a, b, config=config(checkpoint_dir=str(tmp_path)))
    assert len(list(tmp_path.rglob("samples_*.safetensors"))) == 3
    forwarded[0] = 0
    resumed = compute_interference(model, a, b, config=config(checkpoint_dir=str(tmp_path)))
    assert forwarded[0] == 8 - 5  # the three finished shards held samples 0-4 of task A
    for block, scores in reference.scores.items():
        torch.testing.assert_close(resumed.scores[block], scores, rtol=0, atol=0)
    forwarded[0] = 0
    again = compute_interference(model, a, b, config=config(checkpoint_dir=str(tmp_path)))
    assert forwarded[0] == 0 and torch.equal(again.scores["O"], reference.scores["O"])


def test_other_settings_do_not_reuse_shards(tmp_path, forwarded):
    model, (a, b) = builders.gqa_under_test(), tasks()
    compute_interference(model, a, b, config=config(checkpoint_dir=str(tmp_path)))
    forwarded[0] = 0
    compute_interference(model, a, b, config=config(checkpoint_dir=str(tmp_path), include_biases=True))
    assert forwarded[0] == 8
    forwarded[0] = 0
    other = a.clone()
    other[0, 3] = (other[0, 3] + 1) % builders.D_VOCAB
    compute_interference(model, other, b, config=config(checkpoint_dir=str(tmp_path)))
    assert forwarded[0] == 5  # task A changed: recomputed; task B's shards reused
    forwarded[0] = 0
    compute_interference(builders.gqa_under_test(seed=1), a, b, config=config(checkpoint_dir=str(tmp_path)))
    assert forwarded[0] == 8  # other weights


def test_a_checkpoint_dir_that_is_a_file_is_a_clear_error(tmp_path):
    model, (a, b) = builders.gqa_under_test(), tasks()
    path = tmp_path / "not_a_folder"
    path.write_text("x")
    with pytest.raises(ValueError, match="checkpoint_dir .*not_a_folder: cannot make the shard folder"):
        compute_interference(model, a, b, config=config(checkpoint_dir=str(path)))


@pytest.mark.parametrize("damage", ["truncated", "foreign"])
def test_a_damaged_shard_warns_with_its_path_and_is_recomputed(tmp_path, forwarded, damage):
    """Errors are never swallowed: a shard that cannot be read (a torn file) or is not this run's (other arrays)
    warns, naming the file and why, and is computed again; the result is the uninterrupted run's."""
    from safetensors.torch import save_file

    model, (a, b) = builders.gqa_under_test(), tasks()
    reference = compute_interference(model, a, b, config=config(checkpoint_dir=str(tmp_path)))
    shard = sorted(tmp_path.rglob("samples_0-2.safetensors"))[0]
    if damage == "truncated":
        shard.write_bytes(shard.read_bytes()[:100])
    else:
        save_file({"z": torch.ones(3), checkpoint.BAD: torch.zeros(0, dtype=torch.int64)}, str(shard))
    forwarded[0] = 0
    with pytest.warns(RuntimeWarning, match=f"checkpoint shard {re.escape(str(shard))} cannot be used .*again"):
        resumed = compute_interference(model, a, b, config=config(checkpoint_dir=str(tmp_path)))
    assert forwarded[0] == 2  # only the damaged shard
    for block, scores in reference.scores.items():
        torch.testing.assert_close(resumed.scores[block], scores, rtol=0, atol=0)
    forwarded[0] = 0
    compute_interference(model, a, b, config=config(checkpoint_dir=str(tmp_path)))
    assert forwarded[0] == 0  # it was written again

