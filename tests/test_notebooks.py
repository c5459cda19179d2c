"""The notebooks (one per section of the paper, ``notebooks/``) run from top to bottom.

Each notebook checks what it shows with ``assert``s (a gradient against its formula, a mask against
the property it claims, ...), so executing it is a test of those claims as well as of the notebook.
They are committed without outputs, so what a reader sees is what the package gives now.
"""
import os
import re
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
PAPER_SECTIONS = ["3.1", "3.2", "3.3", "3.4", "3.5", "4", "5", "6"]
FILES = sorted(NOTEBOOKS.glob("*.ipynb"))


def _jupyter():
    """nbformat and nbclient (the test extra installs them, with ipykernel for the kernel)."""
    try:
        import nbclient
        import nbformat
    except ImportError as e:       # CI installs the test extra: a missing one there is a failure
        if os.environ.get("CI"):
            pytest.fail(f"executing the notebooks needs nbformat, nbclient and ipykernel: {e}")
        pytest.skip(f"nbformat/nbclient not installed ({e}); pip install -e '.[test]'")
    return nbformat, nbclient


def _section(path):
    return re.match(r"(\d+(?:\.\d+)?)_", path.name).group(1)


def test_every_section_of_the_paper_has_a_notebook():
    sections = {_section(p) for p in FILES}
    assert set(PAPER_SECTIONS) <= sections, f"no notebook for § {sorted(set(PAPER_SECTIONS) - sections)}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
    nbformat, _ = _jupyter()
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    stale = [i for i, cell in enumerate(nb.cells)
             if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)]
    assert not stale, f"{path.name}: cells {stale} carry outputs; clear them before committing"
    title = nb.cells[0].source.splitlines()[0]
    assert nb.cells[0].cell_type == "markdown" and title.startswith(f"# §{_section(path)} "), \
        f"{path.name} should open with a '# §{_section(path)} …' title, not {title!r}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.stem)
def test_notebook_runs_top_to_bottom(path, tmp_path):
    nbformat, nbclient = _jupyter()
    nb = nbformat.read(path, as_version=4)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(NOTEBOOKS.parent), os.environ.get("PYTHONPATH", "")]))
    env["MT_RUN_DIR"] = "tiny"           # §6 trains its own small model rather than load a run's
    env.pop("MT_FAKE_CUDA", None)
    # tiny models' many small products: one BLAS thread is faster, and keeps CI's time steady
    env.setdefault("OPENBLAS_NUM_THREADS", "1")
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    try:
        client.execute(env=env)      # a failing cell raises CellExecutionError with its traceback
    finally:
        nbformat.write(nb, tmp_path / path.name)     # the executed copy, to read after a failure
