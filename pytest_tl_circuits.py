"""tl_circuits' pytest plugin: fixtures for the bundled models, tiny models of every architecture, seeded task
batches, and the options and marks to choose them (docs/testing.md).

Installing tl_circuits registers it (the ``pytest11`` entry point ``pytest_tl_circuits``); ``-p no:tl_circuits``
turns it off, and ``-p pytest_tl_circuits`` turns it on where plugin autoloading is disabled.

It must cost nothing to a test run that does not use it, so this module is a top-level module rather than part of
the ``tl_circuits`` package (importing any ``tl_circuits.*`` module imports the whole package, torch and
TransformerLens with it) and imports only pytest: every fixture imports what it needs when it runs. Every name it
adds starts with ``tlc``.

Fixtures (function scope unless said):

- ``tlc_seed`` (session): the seed of everything below, ``--tlc-seed`` (default 0).
- ``tlc_bundled_name``: which bundled model: the ``tlc_bundled("name")`` mark, an indirect parameter, or
  ``tl_circuits.DEFAULT_BUNDLED_MODEL``; ``tlc_bundled_model``: a fresh copy of it
  (``tl_circuits.load_bundled_model``); ``tlc_bundled_info``: its ``BundledModelInfo`` (known heads, tasks).
- ``tlc_task_batch``: ``make(task, n=16, *, seed=None, **settings) -> TaskBatch``: ``n`` distinct rows of the task,
  seeded with ``tlc_seed`` (or ``seed``): as the bundled model in use was evaluated on it, or, given ``settings``,
  with exactly those generator settings (e.g. ``d_vocab=50, seq_len=12`` for a tiny model).
- ``tlc_architecture``: an architecture name; tests that take it (or ``tlc_tiny_model``) run once per architecture
  of ``--tlc-architectures`` (``all``, the default; ``representative``; or names, comma-separated), narrowed by the
  ``tlc_architectures(*names, features=(...))`` mark. Parametrize ``tlc_architecture`` yourself to choose outright.
- ``tlc_model_kind``: ``"bridge"``; override the fixture (or parametrize it) with ``"hooked"`` for
  HookedTransformers on TransformerLens < 4.
- ``tlc_tiny_model``: a fresh ``tl_circuits.testing.tiny_model(tlc_architecture, tlc_seed, kind=tlc_model_kind)``;
  skipped, with the reason, where the installed TransformerLens or transformers cannot give it.
- ``tlc_tiny_hf_dir``: a folder holding that model's Hugging Face files and tokenizer (``tiny_hf_dir``).
- ``tlc_make_tiny_model`` (session): ``make(architecture, seed=None, *, kind="bridge", n_layers=None)``, with the
  same skips.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import pytest

ARCHITECTURE_FIXTURE = "tlc_architecture"
_MARKS = {
    "tlc_bundled": "tlc_bundled(name): the bundled model of the tlc_bundled_* fixtures and tlc_task_batch",
    "tlc_architectures": "tlc_architectures(*names, features=()): narrow the architectures tlc_architecture runs "
                         "over to these names and/or those with every feature (tl_circuits.testing.FEATURES)",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tl_circuits", "tl_circuits fixtures (tlc_*)")
    group.addoption("--tlc-seed", type=int, default=0, dest="tlc_seed",
                    help="seed of the tlc_* fixtures' models and task batches (default 0)")
    group.addoption("--tlc-architectures", default="all", dest="tlc_architectures",
                    help="architectures that tests taking tlc_architecture / tlc_tiny_model run over: 'all' "
                         "(default), 'representative', or comma-separated names")


def pytest_configure(config: pytest.Config) -> None:
    for line in _MARKS.values():
        config.addinivalue_line("markers", line)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Parametrize ``tlc_architecture`` over the selected architectures, unless the test does it itself."""
    if ARCHITECTURE_FIXTURE not in metafunc.fixturenames:
        return
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0] if mark.args else mark.kwargs.get("argnames", "")
        if ARCHITECTURE_FIXTURE in ([n.strip() for n in names.split(",")] if isinstance(names, str) else names):
            return
    from tl_circuits.testing.architectures import select_architectures

    narrowing = metafunc.definition.get_closest_marker("tlc_architectures")
    names, features = (narrowing.args, narrowing.kwargs.get("features", ())) if narrowing else ((), ())
    chosen = select_architectures(metafunc.config.getoption("tlc_architectures"), names, features)
    metafunc.parametrize(ARCHITECTURE_FIXTURE, chosen, ids=chosen)


# ----- fixtures -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tlc_seed(pytestconfig: pytest.Config) -> int:
    """The seed of the tlc_* models and batches (``--tlc-seed``, default 0)."""
    return int(pytestconfig.getoption("tlc_seed"))


@pytest.fixture
def tlc_bundled_name(request: pytest.FixtureRequest) -> str:
    """The bundled model's name: an indirect parameter, else the ``tlc_bundled`` mark, else the default one."""
    if hasattr(request, "param"):
        return str(request.param)
    mark = request.node.get_closest_marker("tlc_bundled")
    if mark is not None:
        if len(mark.args) != 1:
            raise pytest.UsageError(f"tlc_bundled takes one bundled model name, got {mark.args}")
        return str(mark.args[0])
    from tl_circuits import DEFAULT_BUNDLED_MODEL

    return DEFAULT_BUNDLED_MODEL


@pytest.fixture
def tlc_bundled_model(tlc_bundled_name: str) -> Any:
    """A fresh copy of the bundled model (a HookedTransformer on TransformerLens < 4, a bridge on 4.x)."""
    from tl_circuits import load_bundled_model

    return load_bundled_model(tlc_bundled_name)


@pytest.fixture
def tlc_bundled_info(tlc_bundled_name: str) -> Any:
    """The bundled model's ``BundledModelInfo``: ``known_heads``, ``control_heads``, ``tasks``, metrics."""
    from tl_circuits import bundled_model_info

    return bundled_model_info(tlc_bundled_name)


@pytest.fixture
def tlc_task_batch(tlc_bundled_name: str, tlc_seed: int) -> Callable[..., Any]:
    """``make(task, n=16, *, seed=None, **settings)``: n distinct rows of ``task`` (``tl_circuits.distinct_batch``),
    seeded with ``tlc_seed`` unless ``seed`` is given. Without ``settings``, the task as the bundled model in use
    was evaluated on it (``tl_circuits.bundled_tasks``); with them, exactly those generator settings."""
    from tl_circuits import bundled_tasks, distinct_batch

    def make(task: str, n: int = 16, *, seed: Optional[int] = None, **settings: Any) -> Any:
        seed = tlc_seed if seed is None else seed
        if settings:
            return distinct_batch(task, n, seed=seed, **settings)
        makers = bundled_tasks(tlc_bundled_name)
        if task not in makers:
            raise ValueError(f"the bundled model {tlc_bundled_name!r} was evaluated on {list(makers)}, not {task!r}: "
                             "give the task's settings (e.g. seq_len=..., d_vocab=...)")
        return makers[task](n, seed=seed)

    return make


@pytest.fixture
def tlc_architecture(request: pytest.FixtureRequest) -> str:
    """One architecture name of ``tl_circuits.testing.TINY_ARCHITECTURES`` (parametrized by the plugin)."""
    if not hasattr(request, "param"):
        raise pytest.UsageError("tlc_architecture is parametrized by the plugin; request it as a test argument")
    return str(request.param)


@pytest.fixture
def tlc_model_kind() -> str:
    """``"bridge"``; override this fixture with ``"hooked"`` for HookedTransformers (TransformerLens < 4)."""
    return "bridge"


def _make_or_skip(architecture: str, seed: int, kind: str, n_layers: Optional[int]) -> Any:
    from tl_circuits.testing import tiny_model, unsupported_reason

    reason = unsupported_reason(architecture, kind)  # type: ignore[arg-type]
    if reason is not None:
        pytest.skip(reason)
    return tiny_model(architecture, seed, kind=kind, n_layers=n_layers)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def tlc_make_tiny_model(tlc_seed: int) -> Callable[..., Any]:
    """``make(architecture, seed=None, *, kind="bridge", n_layers=None)``: a fresh tiny model (``tlc_seed`` unless
    ``seed`` is given); skips the test, with the reason, where the installed libraries cannot give it."""

    def make(architecture: str, seed: Optional[int] = None, *, kind: str = "bridge",
             n_layers: Optional[int] = None) -> Any:
        return _make_or_skip(architecture, tlc_seed if seed is None else seed, kind, n_layers)

    return make


@pytest.fixture
def tlc_tiny_model(tlc_architecture: str, tlc_seed: int, tlc_model_kind: str) -> Any:
    """A fresh tiny model of ``tlc_architecture`` (``tl_circuits.testing.tiny_model``), or a skip with the reason."""
    return _make_or_skip(tlc_architecture, tlc_seed, tlc_model_kind, None)


@pytest.fixture
def tlc_tiny_hf_dir(tlc_architecture: str, tlc_seed: int, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A folder with the Hugging Face files (config, weights, tokenizer) of ``tlc_architecture``'s tiny model."""
    from tl_circuits.testing import hf_unsupported_reason, tiny_hf_dir

    reason = hf_unsupported_reason(tlc_architecture)
    if reason is not None:
        pytest.skip(reason)
    return tiny_hf_dir(tlc_architecture, tmp_path_factory.mktemp(f"tiny-{tlc_architecture}"), tlc_seed)
