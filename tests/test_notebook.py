"""The inspection notebook runs headless against a trained checkpoint and draws its figures."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from medseg.run_notebook import run_notebook
from medseg.training import train
from medseg.viz import latest_checkpoint

from test_train import tiny_run

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "inspect_predictions.ipynb"


def test_notebook_is_stored_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not cell.get("outputs") and cell.get("execution_count") is None for cell in notebook.cells if cell.cell_type == "code")


@pytest.mark.slow
def test_notebook_runs_against_a_checkpoint(brats_tree, tmp_path, monkeypatch):
    run = tmp_path / "outputs" / "demo" / "runs" / "run1"
    train(tiny_run(brats_tree, run, "trainer.max_epochs=2", "trainer.check_val_every_n_epoch=1"))
    checkpoint = latest_checkpoint(tmp_path / "outputs" / "demo")
    assert checkpoint.parent == run / "checkpoints" and checkpoint.name.startswith("epoch")

    monkeypatch.setenv("MEDSEG_CHECKPOINT", str(checkpoint))
    monkeypatch.setenv("MEDSEG_REGION", "wt")  # the whole tumour and its satellites: lesions are certain
    executed, figures = run_notebook(NOTEBOOK, tmp_path / "executed")
    assert figures == 2  # through the largest and through the smallest lesion
    text = "".join(o.get("text", "") for c in nbformat.read(executed, as_version=4).cells if c.cell_type == "code" for o in c.outputs)
    summary = re.search(r"region wt: (\d+) reference lesions, (\d+) missed", text)
    table = re.search(r"region wt: (\d+) true and (\d+) false positive lesions predicted, (\d+) reference lesions missed", text)
    assert summary and table, text
    assert table.group(3) == summary.group(2)  # the lesion table and the per-lesion metrics miss the same lesions
    assert list((run / "inspection").glob("*.nii.gz"))  # the prediction the notebook drew


def test_latest_checkpoint_says_how_to_get_one(tmp_path):
    with pytest.raises(FileNotFoundError, match="make demo"):
        latest_checkpoint(tmp_path)
