"""notebooks/ch05.ipynb runs top to bottom in quick mode; its own cells assert what matters."""

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "ch05.ipynb"


def test_chapter_5_notebook_runs_in_quick_mode(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The user's environment: no JAX_PLATFORMS (conftest sets it for this process), so the kernel's jax starts
    # as a reader's would, and must start quietly (issue 23).
    env = {
        **{k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"},
        "GPTJAX_NOTEBOOK_QUICK": "1",
        # The tests' compilation cache (tests/conftest.py), shared with the kernel's process.
        "JAX_COMPILATION_CACHE_DIR": str(ROOT / ".cache" / "jax"),
        "TMPDIR": str(tmp_path),  # the notebook's checkpoints go to a temporary folder: this test's
    }
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)  # raises CellExecutionError, with the cell and its traceback, if any cell fails
    outputs = "".join(out.get("text", "") for cell in nb.cells for out in cell.get("outputs", []))
    assert "Ep 2 (Step 000015): Train loss" in outputs and "x pizza" in outputs  # the book's printed lines ran
    stderr = "".join(out.get("text", "") for cell in nb.cells for out in cell.get("outputs", [])
                     if out.get("name") == "stderr")
    for noise in ("Traceback", "cudart_stub", "plugin configuration error", "Could not find cuda drivers"):
        assert noise not in stderr, stderr
