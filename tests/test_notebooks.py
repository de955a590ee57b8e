"""Every notebook runs top to bottom, headless (nbclient), on data it generates."""

import shutil
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
sys.path.insert(0, str(NOTEBOOKS[0].parent))


def test_notebooks_are_generated_from_make_notebooks():
    import make_notebooks

    assert [p.name for p in NOTEBOOKS] == [f"{name}.ipynb" for name in make_notebooks.NOTEBOOKS]
    for path in NOTEBOOKS:  # an edit of a notebook by hand, or a generator not rerun, fails
        cells = [(cell.cell_type, cell.source) for cell in nbformat.read(path, as_version=4).cells]
        assert cells == [("markdown" if kind == "md" else "code", source)
                         for kind, source in make_notebooks.NOTEBOOKS[path.stem]], \
            f"{path.name} is not make_notebooks.py's output: run python notebooks/make_notebooks.py"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch, evaluated_runs, tmp_path):
    # 02 explores a results directory: give it the shared tiny run instead of letting it train
    # its own (which it does, and which the README documents, when run by hand), twice (as
    # ce and flsd53), so that its paired comparison of two runs of one row runs too.
    row = tmp_path / "results" / "cifar10" / "resnet50"
    for loss in ("ce", "flsd53"):
        shutil.copytree(evaluated_runs / "cifar10" / "resnet50" / "ce", row / loss)
    monkeypatch.setenv("RESULTS_ROOT", str(tmp_path / "results"))
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    errors = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    images = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
              if "image/png" in o.get("data", {})]
    assert images, "every notebook draws at least one figure"
    if path.stem == "02_explore_results":
        shown = [o["data"].get("text/markdown", "") for cell in nb.cells
                 if cell.cell_type == "code" for o in cell.get("outputs", [])
                 if "data" in o]
        assert any("`other` = " in text and "| ece | 1 |" in text for text in shown), \
            "notebook 02 compares the two runs of its row"


def test_explore_results_says_when_its_root_holds_no_evaluated_run(tmp_path, monkeypatch):
    """A RESULTS_ROOT without results (e.g. the sweep's parent) stops at the first cell that
    reads it, naming the files it looks for, instead of empty tables and a failing plot."""
    monkeypatch.setenv("RESULTS_ROOT", str(tmp_path))
    path = next(p for p in NOTEBOOKS if p.stem == "02_explore_results")
    client = nbclient.NotebookClient(nbformat.read(path, as_version=4), timeout=600,
                                     kernel_name="python3",
                                     resources={"metadata": {"path": str(path.parent)}})
    with pytest.raises(nbclient.exceptions.CellExecutionError,
                       match=f"no evaluated run under {tmp_path}: RESULTS_ROOT must hold"):
        client.execute()
