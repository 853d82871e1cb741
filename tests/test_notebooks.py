"""Every notebook in notebooks/ runs top to bottom (executed with nbclient on CPU), under TransformerLens 3.x and
4.x alike: they build no HookedTransformer themselves (a bridged Hugging Face model, or the bundled models: a
HookedTransformer under 3.x, a bridge under 4.x)."""

from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(path, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
