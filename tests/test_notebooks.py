"""The teaching notebooks: committed with their outputs stripped, and running top to bottom at
their small settings (``FULL = False``) on a fresh kernel, as a user would run them."""

import json
import time
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "examples" / "notebooks").glob("*.ipynb"))
NAMES = [path.name for path in NOTEBOOKS]


def test_the_five_notebooks_exist():
    assert len(NOTEBOOKS) == 5, NAMES


@pytest.mark.parametrize("name", NAMES)
def test_outputs_are_stripped(name):
    notebook = json.loads((NOTEBOOKS[0].parent / name).read_text(encoding="utf-8"))
    dirty = [
        index
        for index, cell in enumerate(notebook["cells"])
        if cell["cell_type"] == "code" and (cell.get("outputs") or cell.get("execution_count") is not None)
    ]
    assert not dirty, (
        f"{name}: cells {dirty} hold outputs or execution counts; strip them with "
        "`jupyter nbconvert --clear-output --inplace examples/notebooks/*.ipynb`"
    )


@pytest.mark.parametrize("name", NAMES)
def test_parameter_cell_defaults_to_small_settings(name):
    notebook = json.loads((NOTEBOOKS[0].parent / name).read_text(encoding="utf-8"))
    first_code = next(cell for cell in notebook["cells"] if cell["cell_type"] == "code")
    assert "FULL = False" in "".join(first_code["source"])


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_top_to_bottom(name, tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    notebook = nbformat.read(NOTEBOOKS[0].parent / name, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    started = time.perf_counter()
    client.execute()
    print(f"{name}: {time.perf_counter() - started:.0f} s")
    errors = [
        output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors
