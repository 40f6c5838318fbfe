"""A training process killed mid-run (SIGTERM or SIGKILL) continues with ``ckpt_path=last`` where it stopped."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
from test_ddp import environment, load, tiny, wait_for

pytestmark = pytest.mark.slow
EPOCHS = 6


@pytest.mark.parametrize("kill", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_killed_training_resumes_with_its_state(brats_tree, tmp_path, kill):
    folder = tmp_path / "run"
    command = [sys.executable, "-m", "medseg.train", *tiny(brats_tree, tmp_path, f"trainer.max_epochs={EPOCHS}", "evaluate_best=false", f"hydra.run.dir={folder}")]
    last = folder / "checkpoints" / "last.ckpt"
    with open(tmp_path / "killed.log", "w") as log:
        job = subprocess.Popen(command, cwd=tmp_path, env=environment(), stdout=log, stderr=subprocess.STDOUT)
        wait_for(last, job)
        job.send_signal(kill)
        status = job.wait(timeout=120)
    # SIGTERM: Lightning stops at the next step; the exit status still says the run did not finish.
    assert status == (128 + signal.SIGTERM if kill == signal.SIGTERM else -signal.SIGKILL)
    if kill == signal.SIGTERM:
        assert f"Continue it with: hydra.run.dir={folder} ckpt_path=last" in (tmp_path / "killed.log").read_text()
    killed = load(last)
    steps_per_epoch = killed["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"]
    assert killed["global_step"] < EPOCHS * steps_per_epoch, "the run finished before it was killed"

    result = subprocess.run([*command, "ckpt_path=last"], cwd=tmp_path, env=environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-6000:]
    assert f"Resuming from {last}" in result.stdout + result.stderr
    final = load(last)
    # Same step count as an uninterrupted run; optimizer and scheduler state came along: AdamW's own step
    # counter and the (per-epoch) scheduler count the steps and epochs of both processes, not just the second.
    assert final["global_step"] == EPOCHS * steps_per_epoch
    adam_steps = {int(state["step"]) for state in final["optimizer_states"][0]["state"].values()}
    assert adam_steps == {final["global_step"]}
    assert final["lr_schedulers"][0]["last_epoch"] == EPOCHS
