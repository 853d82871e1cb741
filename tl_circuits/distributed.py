"""Running the heavy calls over a ``torch.distributed`` process group: the :class:`World` of the calling process and
how to join one from torchrun's environment (docs/spec.md, "Distributed runs"; docs/distributed.md).

>>> from tl_circuits.distributed import World
>>> World(rank=0, size=1).active
False
"""

from tl_circuits.parallel.group import DEFAULT_TIMEOUT_S, World, current_world, init_from_environment

__all__ = ["DEFAULT_TIMEOUT_S", "World", "current_world", "init_from_environment"]
