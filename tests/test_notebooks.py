"""The notebooks: each one runs top to bottom in smoke mode, and the committed files carry no outputs.

Every ``notebooks/*.ipynb`` is picked up automatically. The executing test runs the notebook in a
fresh ``python3`` kernel with ``CTXSEG_SMOKE=1`` (tiny models and data) from ``notebooks/`` and
keeps the executed copy in memory only. A notebook is expected to display at least one ipywidget;
one without widgets opts out with ``"ctxseg": {"expects_widgets": false}`` in its metadata.
"""

import os
import sys
import time
from pathlib import Path

import ipykernel  # noqa: F401 -- the kernel the notebooks run in (dev extra): missing, the test fails
import nbclient
import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NB_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NB_DIR.glob("*.ipynb"))
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
CELL_TIMEOUT = 120


def _ids(paths):
    return [p.name for p in paths]


def _kernel_env(monkeypatch) -> None:
    """Make the kernel the one of this interpreter, on this checkout, in smoke mode.

    jupyter_client starts the ``python3`` kernelspec (``python -m ipykernel_launcher``) with
    ``sys.executable`` in place of ``python``; putting this interpreter's folder first on PATH
    and the repo on PYTHONPATH makes that hold for any other spelling too.
    """
    monkeypatch.setenv("CTXSEG_SMOKE", "1")
    path = [str(Path(sys.executable).parent), os.environ.get("PATH", "")]
    monkeypatch.setenv("PATH", os.pathsep.join(path))
    pythonpath = [str(ROOT), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in pythonpath if p))


def test_notebooks_found():
    assert NOTEBOOKS, f"no notebooks in {NB_DIR}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_runs(path, monkeypatch):
    _kernel_env(monkeypatch)
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT,
        resources={"metadata": {"path": str(NB_DIR)}},
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError (naming the cell) on the first failing cell
    elapsed = time.perf_counter() - start
    print(f"{path.name}: executed in {elapsed:.1f} s")

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    errors = [out for out in outputs if out.output_type == "error"]
    assert not errors, f"{path.name}: cells raised {[(e.ename, e.evalue) for e in errors]}"
    # An interact callback that raises shows its traceback inside its Output widget, not as a
    # cell error: look there too (``execute`` saved the widgets' state in the metadata).
    state = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    widget_errors = [out for model in state.values() if model.get("model_name") == "OutputModel"
                     for out in model["state"].get("outputs", []) if out.get("output_type") == "error"]
    assert not widget_errors, f"{path.name}: widget callbacks raised {[(e['ename'], e['evalue']) for e in widget_errors]}"
    if nb.metadata.get("ctxseg", {}).get("expects_widgets", True):
        widgets = [out for out in outputs if WIDGET_MIME in out.get("data", {})]
        assert widgets, f"{path.name}: no cell displayed an ipywidget ({WIDGET_MIME})"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=_ids(NOTEBOOKS))
def test_notebook_committed_clean(path):
    """Committed notebooks are diff-friendly: no outputs, no execution counts, no widget state."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    kernel = nb.metadata.get("kernelspec", {}).get("name")
    assert kernel == "python3", f"{path.name}: kernelspec is {kernel!r}, expected 'python3'"
    assert "widgets" not in nb.metadata, f"{path.name}: saved widget state in the metadata; strip it"
    for k, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        assert cell.outputs == [], f"{path.name}: cell {k} has saved outputs; clear them before committing"
        assert cell.execution_count is None, f"{path.name}: cell {k} has an execution count; clear it"
