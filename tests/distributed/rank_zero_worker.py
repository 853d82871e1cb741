"""``rank_zero_worker.py OUT NAME ...``: distribution is opt-in. Under a 2-rank gloo group (a short timeout, so a
collective that rank 1 never joins fails instead of hanging), rank 0 alone runs the named scenarios with the
library's default ``world=None`` and writes ``OUT/<name>.pt``; rank 1 joins no collective and waits for
``OUT/done``. Not collected by pytest; started by ``tests/distributed/test_opt_in.py``.
"""

import datetime
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from tests.distributed import scenarios

GROUP_TIMEOUT_S = 30
WAIT_S = 300


def main(out: Path, names: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
    scenarios.world = lambda: None  # every heavy call with its default world: no opt-in
    if dist.get_rank() == 0:
        try:
            for name in names:
                torch.save(scenarios.SCENARIOS[name](), out / f"{name}.pt")
        finally:
            (out / "done").touch()
    else:
        deadline = time.monotonic() + WAIT_S
        while not (out / "done").exists():
            if time.monotonic() > deadline:
                raise TimeoutError("rank 0 never finished")
            time.sleep(0.2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
