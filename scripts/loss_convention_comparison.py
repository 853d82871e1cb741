"""Why the loss convention matters: the bundled default model's interference map with every token's loss against the
map with the loss on the tasks' scored positions only (what the freeze sweep scores).

Draws the two bundled tasks as the command does (``tl_circuits.cli.loading.load_tasks``: ``--n`` distinct samples
per task, task A with ``--seed``, task B with ``--seed + 1``), computes the signed interference with the pooled
Fisher (the report's map) twice, once without and once with the tasks' loss masks, and prints:

- the Spearman correlation of the two maps' cell means (every block, layer and head);
- how many cells are negative (conflicting) in each;
- how many of the ``--top`` most conflicting (most negative) cells the two maps share.

Run from the repository root: ``python scripts/loss_convention_comparison.py [--n 24] [--seed 0] [--top 5]``
(``--smoke``: 4 samples per task, in seconds). The figures are in docs/tasks.md.
"""

from __future__ import annotations

import argparse
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's tl_circuits/

import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from tl_circuits import GradientConfig, InterferenceConfig, compute_interference  # noqa: E402
from tl_circuits.cli.loading import load_model, load_tasks  # noqa: E402


def cell_means(result) -> torch.Tensor:
    """Every (block, layer, head) cell's mean score, blocks in Q, K, V, O order."""
    return torch.cat([result.mean[block].flatten() for block in "QKVO"]).double()


def most_negative(means: torch.Tensor, k: int) -> set[int]:
    return set(torch.argsort(means)[:k].tolist())


def compare(n: int, seed: int, top: int) -> dict:
    """The two maps of the bundled default model on the command's draws, and the figures that compare them."""
    loaded = load_model(None, "cpu")
    task_a, task_b = load_tasks(loaded, n_a=n, n_b=n, seed=seed)
    config = InterferenceConfig(gradients=GradientConfig(progress=False), variant="signed", fisher_source="pooled")
    common = dict(attention_mask_a=task_a.attention_mask, attention_mask_b=task_b.attention_mask, config=config)
    all_tokens = compute_interference(loaded.model, task_a.tokens, task_b.tokens, **common)
    scored = compute_interference(loaded.model, task_a.tokens, task_b.tokens, loss_mask_a=task_a.loss_mask,
                                  loss_mask_b=task_b.loss_mask, **common)
    x, y = cell_means(all_tokens), cell_means(scored)
    return dict(model=loaded.name, tasks=(task_a.name, task_b.name), n=n, seed=seed, cells=len(x),
                counted=(task_a.n_counted.sum().item(), task_b.n_counted.sum().item()),
                valid=(int((task_a.attention_mask[:, 1:] * task_a.attention_mask[:, :-1]).sum()),
                       int((task_b.attention_mask[:, 1:] * task_b.attention_mask[:, :-1]).sum())),
                spearman=float(spearmanr(x.numpy(), y.numpy()).statistic),
                negative_all=int((x < 0).sum()), negative_scored=int((y < 0).sum()), top=top,
                shared_top=len(most_negative(x, top) & most_negative(y, top)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=24, help="samples per task (default 24)")
    parser.add_argument("--seed", type=int, default=0, help="the command's --seed (default 0)")
    parser.add_argument("--top", type=int, default=5, help="most conflicting cells compared (default 5)")
    parser.add_argument("--smoke", action="store_true", help="4 samples per task: checks that the script runs")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    out = compare(4 if args.smoke else args.n, args.seed, args.top)
    print(f"model {out['model']}, tasks {out['tasks'][0]} and {out['tasks'][1]}, {out['n']} + {out['n']} samples "
          f"(seeds {out['seed']}, {out['seed'] + 1}); torch {torch.__version__}, {platform.machine()}")
    print(f"predictions counted: all tokens {out['valid'][0]} + {out['valid'][1]}, "
          f"scored positions {out['counted'][0]} + {out['counted'][1]}")
    print(f"Spearman correlation of the {out['cells']} cell means: {out['spearman']:.2f}")
    print(f"negative cells: all-token map {out['negative_all']} of {out['cells']}, scored-token map "
          f"{out['negative_scored']} of {out['cells']}")
    print(f"most conflicting {out['top']} cells shared by the two maps: {out['shared_top']} of {out['top']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
