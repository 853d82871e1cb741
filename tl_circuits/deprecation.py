"""Deprecations, one way: a warning class of this package and the helpers that raise it.

Every old spelling kept for one minor version (an argument, a field, a function name) warns with
:class:`TLCircuitsDeprecationWarning`, a ``DeprecationWarning``, so a test suite can turn exactly this package's
deprecations into errors (pytest: ``filterwarnings = ["error::tl_circuits.deprecation.TLCircuitsDeprecationWarning"]``)
without failing on other libraries' warnings.

>>> import warnings
>>> with warnings.catch_warnings(record=True) as caught:
...     warnings.simplefilter("always")
...     renamed_argument("max_batch_rows", "chunk_size", 7, None, default=None)
7
>>> caught[0].category.__name__, str(caught[0].message)
('TLCircuitsDeprecationWarning', 'max_batch_rows= is deprecated; use chunk_size= (the same meaning)')
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, TypeVar

T = TypeVar("T")


class TLCircuitsDeprecationWarning(DeprecationWarning):
    """An old spelling of tl_circuits that still works for one minor version."""


def warn_deprecated(message: str, stacklevel: int = 3) -> None:
    """Warn :class:`TLCircuitsDeprecationWarning` with ``message`` (``stacklevel`` 3: the caller's caller)."""
    warnings.warn(message, TLCircuitsDeprecationWarning, stacklevel=stacklevel)


def renamed_argument(old: str, new: str, old_value: Optional[T], new_value: Optional[T], *,
                     default: Any, note: str = "the same meaning") -> Optional[T]:
    """The value of a renamed keyword: ``new_value``, or the deprecated ``old_value`` (with a warning).

    Giving both (the new one not at its ``default``) is an error naming the two.
    """
    if old_value is None:
        return new_value
    warn_deprecated(f"{old}= is deprecated; use {new}= ({note})", stacklevel=4)
    if new_value is not None and new_value != default:
        raise ValueError(f"pass {new}= or the deprecated {old}=, not both")
    return old_value


def deprecated_alias(old: str, new: str) -> property:
    """A read-only property ``old`` of a result that returns the field ``new``, with a warning.

    >>> from dataclasses import dataclass
    >>> @dataclass
    ... class R:
    ...     p_value: float
    ...     pvalue = deprecated_alias("pvalue", "p_value")
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     R(0.5).pvalue
    0.5
    """

    def read(self: Any) -> Any:
        warn_deprecated(f"{type(self).__name__}.{old} is deprecated; use .{new}", stacklevel=3)
        return getattr(self, new)

    read.__doc__ = f"Deprecated: the field ``{new}``."
    return property(read)


def deprecated_function(old: str, function: Callable[..., T], new: str) -> Callable[..., T]:
    """``function`` under its old name ``old``, warning at each call that ``new`` is its name now."""

    def call(*args: Any, **kwargs: Any) -> T:
        warn_deprecated(f"{old} is deprecated; use {new}", stacklevel=3)
        return function(*args, **kwargs)

    call.__name__ = call.__qualname__ = old.rsplit(".", 1)[-1]
    call.__doc__ = f"Deprecated: {new}."
    return call


__all__ = ["TLCircuitsDeprecationWarning", "deprecated_alias", "deprecated_function", "renamed_argument",
           "warn_deprecated"]
