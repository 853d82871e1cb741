"""Helpers shared by the ``tl-circuits`` command tests: in-process runs, report checks, inputs on disk."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from tl_circuits.cli.command import main
from tl_circuits.cli.output import FILES

REPO = Path(__file__).resolve().parents[2]
SMALL = ["--n-permutations", "99", "--n-bootstrap", "50", "--quiet"]


def run_main(args, capsys) -> tuple[int, str, list[str]]:
    """(exit status, stdout, stderr lines) of an in-process run."""
    status = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return status, out, [line for line in err.splitlines() if line.strip()]


def assert_complete_report(out: Path) -> None:
    """Every promised file exists, report.md embeds every PNG, and no partial directory is left beside it."""
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)
    markdown = (out / "report.md").read_text()
    embedded = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert sorted(embedded) == sorted(name for name in FILES if name.endswith(".png"))
    for name in embedded:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.parent.iterdir() if ".partial-" in p.name or ".old-" in p.name]


def grid_from_csv(frame: pd.DataFrame, column: str, shape) -> np.ndarray:
    grid = np.full(shape, np.nan)
    grid[frame["layer"].to_numpy(), frame["head"].to_numpy()] = frame[column].to_numpy()
    return grid


def json_grid(values) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)


# ----- inputs written to disk ------------------------------------------------------------------------

def write_ids(path: Path, rows) -> Path:
    path.write_text("\n".join(" ".join(str(int(t)) for t in row) for row in rows) + "\n")
    return path


def right_pad(rows, pad: int = 0):
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), pad, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return tokens, mask



def word_tokenizer():
    """A word-level Hugging Face tokenizer built offline (prepends <bos>, pads with <pad>)."""
    from tokenizers import Tokenizer, processors
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    words = "the cat dog sat on mat ran far a big small red blue bird sang".split()
    vocab = {"<bos>": 0, "<pad>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<bos>",
                                   pad_token="<pad>", unk_token="<unk>"), len(vocab)



def checkpoint_args(inputs, out) -> list:
    root = inputs["root"]
    return ["--model", root / "model", "--task-a", root / "a.tokens", "--task-b", root / "b.npy", *SMALL, "--out", out]



def bpe_tokenizer():
    """A byte-level BPE tokenizer trained offline on a few sentences (GPT-2's scheme: a word's leading space is part of
    its token, ``"Ġparis"``), prepending ``<bos>``. Trained so that ``" paris"`` and ``" capital"`` are single
    tokens: ``"the answer is " + "paris"`` then tokenises across the prompt/completion boundary."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    corpus = ["the capital of france is paris", "the answer is paris", "paris is the capital",
              "the capital city is paris", "is it paris or the capital"] * 20
    backend = Tokenizer(BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<bos>", "<pad>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(corpus, trainer)
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<bos>", pad_token="<pad>")
