"""``command_worker.py FAIL_RANK ARGS...``: ``tl-circuits ARGS`` as ``torchrun -m tl_circuits`` runs it, except that
rank FAIL_RANK (``-1``: none) raises in the middle of the distributed score pass, after the gradients (a rank that
fails while the others wait in a collective)."""

import sys

from tl_circuits.cli.command import main


def inject_failure() -> None:
    from tl_circuits.parallel import scores

    def failing(*args, **kwargs):
        raise RuntimeError("injected failure in the score pass")

    scores.my_items = failing  # the score pass asks for its items first


if __name__ == "__main__":
    import os

    fail_rank = int(sys.argv[1])
    if int(os.environ["RANK"]) == fail_rank:
        inject_failure()
    sys.exit(main(sys.argv[2:]))
