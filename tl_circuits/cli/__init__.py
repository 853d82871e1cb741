"""The ``tl-circuits`` command: options, loading, task files, the analysis and its report."""

from tl_circuits.cli.command import main

__all__ = ["main"]
