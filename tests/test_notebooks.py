"""The notebooks in notebooks/: stored clean, and each runs top to bottom in a fresh kernel.

Each notebook ends with assertions about what it showed (completeness of every result, and
the mechanism found on the demo model), so executing it without a cell error is the test.
The kernel runs offline (``HF_HUB_OFFLINE``): in ``MODEL = "demo"`` mode nothing may download.
"""

import os
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = ["quickstart", "capitals", "addition", "features", "graphs"]
#: per notebook; each takes well under a minute on a CPU (most of it loading the model)
TIMEOUT_S = 300
#: notebooks that show CircuitsVis widgets (the ``viz``/``test`` extras install circuitsvis)
NEEDS_CIRCUITSVIS = {"capitals"}


def _read(name: str):
    return nbformat.read(NOTEBOOK_DIR / f"{name}.ipynb", as_version=nbformat.NO_CONVERT)


def test_every_notebook_is_listed():
    assert sorted(p.stem for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_clean(name):
    nb = _read(name)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        assert cell.outputs == [], f"{name}.ipynb cell {i} has stored outputs; clear them"
        assert cell.execution_count is None, f"{name}.ipynb cell {i} has an execution count"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_demo_mode_is_the_default(name):
    sources = [c.source for c in _read(name).cells if c.cell_type == "code"]
    assert 'MODEL = "demo"' in sources[0] or 'MODEL = "demo"' in sources[1]


@pytest.mark.notebook
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name):
    if name in NEEDS_CIRCUITSVIS:
        pytest.importorskip("circuitsvis", reason="pip install 'tlprisms[viz]'")
    nb = _read(name)
    client = nbclient.NotebookClient(
        nb,
        timeout=TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    t0 = time.time()
    try:
        client.execute(env=env)
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"{name}.ipynb: a cell failed:\n{err}", pytrace=False)
    elapsed = time.time() - t0
    print(f"{name}.ipynb ran in {elapsed:.1f} s under {sys.executable}")
    for i, cell in enumerate(nb.cells):
        for out in cell.get("outputs", []):
            assert out.output_type != "error", f"{name}.ipynb cell {i}: {out.get('ename')}"
    last = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    assert "hold" in last, f"{name}.ipynb: the final assertions cell printed {last!r}"
