"""Two-process DDP on CPU (gloo): one run folder, one set of checkpoints, metrics equal to one process."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest

from medseg.config import compose
from medseg.predict import load_model

# Opt-in (make test-ddp): one CI run saw rank 1 die during evaluation ("Connection closed by peer"),
# which five reruns did not reproduce; until that is understood it must not gate the default suite.
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get("MEDSEG_TEST_DDP") != "1", reason="2-process DDP run: set MEDSEG_TEST_DDP=1 (make test-ddp)"),
]


def test_two_process_ddp_matches_single_process(brats_tree, tmp_path):
    run = tmp_path / "run"
    command = [
        sys.executable, "-m", "medseg.train", "+experiment=demo", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
        "trainer.precision=32-true", f"data.root={brats_tree}", "data.synthetic=null", "data.num_workers=0",
        "data.patch_size=[32,32,32]", "data.val_fraction=0.5", "trainer.max_epochs=2", "trainer.check_val_every_n_epoch=1",
        f"hydra.run.dir={run}", f"paths.log_dir={tmp_path / 'outputs'}",
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-12000:]

    # One run folder for both ranks (no second timestamped folder from the re-launched rank 1).
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert len(checkpoints) == 2 and "last.ckpt" in checkpoints
    split = json.loads((run / "split.json").read_text())
    assert len(split["val"]) == 3  # odd: a padding sampler would repeat one case on the second process

    # Every validation case exactly once in the per-case table.
    rows = list(csv.DictReader((run / "test_cases.csv").open()))
    assert sorted(r["case"] for r in rows if r["region"] == "wt") == sorted(split["val"])

    # The same checkpoint evaluated by one process on the same cases gives the same numbers.
    summary = json.loads((run / "metrics.json").read_text())
    model, cfg = load_model(summary["checkpoint"])
    single = compose("train", ["+experiment=demo", f"data.root={brats_tree}", "data.synthetic=null", "data.num_workers=0", f"data.split_path={run / 'split.json'}", f"paths.output_dir={tmp_path / 'single'}"])
    from hydra.utils import instantiate

    datamodule = instantiate(single.data)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path / "single")
    metrics = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    for key in ("test/dice", "test/dice_wt", "test/dice_et", "test/iou_tc", "test/recall_et", "test/lesion_recall_wt", "test/lesion_dice_et"):
        assert metrics[key] == pytest.approx(summary["metrics"][key], abs=1e-6), key
