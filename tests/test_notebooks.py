"""Every notebook runs top to bottom, headless (nbclient), on data it generates."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_notebooks_are_generated_from_make_notebooks():
    assert [p.name for p in NOTEBOOKS] == ["01_losses_and_metrics.ipynb",
                                           "02_explore_results.ipynb", "03_ood.ipynb"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, monkeypatch, evaluated_runs):
    # 02 explores a results directory: give it the shared tiny one instead of letting it
    # train its own (which it does, and which the README documents, when run by hand).
    monkeypatch.setenv("RESULTS_ROOT", str(evaluated_runs))
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
