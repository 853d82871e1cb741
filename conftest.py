"""Doctests of the package (``pytest --doctest-modules tl_circuits``) under TransformerLens 4.x.

TransformerLens 4.x removed ``HookedTransformer``. Most examples in tl_circuits' docstrings use a model that exists
on every supported version (a bundled model, or a tiny Hugging Face model wrapped in a ``TransformerBridge``); the
ones about HookedTransformer itself (``tl_circuits.models.hooked``, the checkpoint format of
``tl_circuits.models.checkpoint``, training the bundled models in ``tl_circuits.bundled.training``) use one.

The rule: where ``transformer_lens`` has no ``HookedTransformer``, a doctest (one docstring's examples) is skipped
when the code of one of its examples, comments left out, names ``HookedTransformer`` (imports, builds or checks for
one). ``grep -rn ">>> .*HookedTransformer\\|^ *\\.\\.\\. .*HookedTransformer" tl_circuits`` lists the candidates
(a hit only in a ``#`` comment does not count). Everything else runs on every version.

Only doctest items are touched: the test suite's own rule (tests marked ``needs_hooked_transformer`` are skipped,
tests/conftest.py) is separate. This file sits at the repository root so that it is not part of the package.
"""

from __future__ import annotations

import io
import re
import tokenize

import pytest

# tl_circuits' own pytest plugin (fixtures tlc_*; the tests use them). An install registers it through its pytest11
# entry point, under this same name, so listing it here is a no-op then; a checkout without that install gets it here.
# pytester runs the documented example test file (tests/testing/test_plugin.py).
pytest_plugins = ["pytest_tl_circuits", "pytester"]

NAMES_HOOKED_TRANSFORMER = re.compile(r"\bHookedTransformer\b")
SKIP_REASON = ("doctest uses transformer_lens.HookedTransformer, which this TransformerLens (4.x) removed; "
               "it runs under TransformerLens < 4")


def _has_hooked_transformer() -> bool:
    try:  # 4.x raises ImportError (not AttributeError) for the removed name
        from transformer_lens import HookedTransformer  # noqa: F401
    except ImportError:
        return False
    return True


def _code_without_comments(source: str) -> str:
    """The example's code with its ``#`` comments left out (the source as it is if it does not tokenize)."""
    try:
        tokens = tokenize.generate_tokens(io.StringIO(source).readline)
        return " ".join(tok.string for tok in tokens if tok.type != tokenize.COMMENT)
    except (tokenize.TokenError, SyntaxError):
        return source


def names_hooked_transformer(item: pytest.Item) -> bool:
    """Whether a doctest item's examples name ``HookedTransformer`` in their code (comments left out)."""
    examples = getattr(getattr(item, "dtest", None), "examples", None) or []
    return any(NAMES_HOOKED_TRANSFORMER.search(_code_without_comments(example.source)) for example in examples)


def pytest_collection_modifyitems(config, items):
    doctests = [item for item in items if isinstance(item, pytest.DoctestItem)]
    if not doctests or _has_hooked_transformer():
        return
    skip = pytest.mark.skip(reason=SKIP_REASON)
    for item in doctests:
        if names_hooked_transformer(item):
            item.add_marker(skip)
