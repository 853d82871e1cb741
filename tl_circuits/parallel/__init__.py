"""Past one process: the heavy calls split their work over an initialised ``torch.distributed`` process group.

See docs/spec.md ("Distributed runs"): :mod:`~tl_circuits.parallel.group` (ranks, shares, exact merges),
:mod:`~tl_circuits.parallel.shards` (sample shards), :mod:`~tl_circuits.parallel.scores` (the score pass's
(block, layer group) items).
"""

from tl_circuits.parallel.group import (
    DEFAULT_TIMEOUT_S,
    World,
    all_succeeded,
    current_world,
    init_from_environment,
    launched_by_torchrun,
    shard,
)

__all__ = ["DEFAULT_TIMEOUT_S", "World", "all_succeeded", "current_world", "init_from_environment",
           "launched_by_torchrun", "shard"]
