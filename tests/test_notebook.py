"""notebooks/sampling.ipynb: executed top to bottom in a real Jupyter kernel on a tiny checkpoint; public API only;
committed with its outputs and small."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import train

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "sampling.ipynb"
CHECKPOINT_LINE = re.compile(r'^CHECKPOINT = ".*"$', re.MULTILINE)


def code_cells(nb: nbformat.NotebookNode) -> list[str]:
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def tiny_run(out: Path, objective: str) -> Path:
    """A 20-step DiT on the digits, small enough for a test; returns its checkpoint (OUT/checkpoints/last.pt)."""
    argv = [
        "--dataset",
        "digits",
        "--image-size",
        "8",
        "--channels",
        "1",
        "--no-flip",
        "--model",
        "DiT-XS/2",
        "--hidden-size",
        "32",
        "--depth",
        "1",
        "--num-heads",
        "2",
        "--steps",
        "20",
        "--batch-size",
        "32",
        "--warmup",
        "5",
        "--log-every",
        "5",
        "--sample-every",
        "0",
        "--fid-every",
        "0",
        "--wandb",
        "disabled",
        "--num-workers",
        "0",
        "--device",
        "cpu",
        "--no-compile",
        "--objective",
        objective,
        "--out",
        str(out),
    ]
    train.main(train.parse_args(argv))
    return out / "checkpoints" / "last.pt"


@pytest.mark.parametrize("objective", ["flow", "meanflow"])
def test_notebook_runs_top_to_bottom_on_a_tiny_checkpoint(tmp_path, one_thread, monkeypatch, objective):
    checkpoint = tiny_run(tmp_path / "run", objective)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    first = next(cell for cell in nb.cells if cell.cell_type == "code")
    assert len(CHECKPOINT_LINE.findall(first.source)) == 1, "the first code cell must name CHECKPOINT on one line"
    first.source = CHECKPOINT_LINE.sub(lambda _: f"CHECKPOINT = {str(checkpoint)!r}", first.source)

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the kernel is a separate process: one thread there too,
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # and idle OpenMP threads that sleep rather than spin
    client = NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    client.execute()  # raises CellExecutionError on the first cell that fails

    outputs = [output for cell in nb.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "does not exist" not in text  # it used the tiny checkpoint instead of training one
    mean_flow = objective == "meanflow"
    assert ("flow model, not a MeanFlow model" in text) != mean_flow
    images = [mime for o in outputs if o.output_type == "display_data" for mime in o.data if mime.startswith("image/")]
    assert images.count("image/gif") == 1  # the trajectory animation
    # class grid, CFG sweep, solvers, quality plot, training curves, and the one-step samples of a MeanFlow model
    assert images.count("image/png") == 5 + mean_flow
    assert (tmp_path / "run" / "notebook" / "trajectory.gif").is_file()  # pictures go to the run folder


def test_notebook_code_uses_no_private_names():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for source in code_cells(nb):
        tree = ast.parse(source)
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Attribute):
                names = [node.attr]
            elif isinstance(node, ast.Import | ast.ImportFrom):
                names = [part for alias in node.names for part in alias.name.split(".")]
                names += (getattr(node, "module", None) or "").split(".")
            for name in names:
                is_dunder = name.startswith("__") and name.endswith("__")
                assert not (name.startswith("_") and not is_dunder), f"private name {name!r} in a notebook cell"


def test_notebook_is_committed_with_its_outputs_and_small():
    assert NOTEBOOK.stat().st_size < 1_000_000
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert CHECKPOINT_LINE.search(code_cells(nb)[0])
    mimes = {mime for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs for mime in o.get("data", {})}
    assert {"image/png", "image/gif"} <= mimes  # the repository page shows the pictures
    assert str(ROOT) not in NOTEBOOK.read_text() and "/tmp/" not in NOTEBOOK.read_text()  # no paths of one machine
