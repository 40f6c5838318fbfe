"""Several processes on CPU (gloo): Lightning DDP, torchrun, simulated SLURM tasks and a Hydra multirun.

Each run must leave one run folder and one set of checkpoints, and give the metrics one process gives.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from medseg.config import CONFIG_DIR
from medseg.data.layouts import find_cases
from medseg.prediction import load_model

pytestmark = pytest.mark.slow
SBATCH = CONFIG_DIR.parent / "scripts" / "slurm" / "train.sbatch"


def tiny(root: Path, tmp_path: Path, *extra: str) -> list[str]:
    """Overrides for a few-second demo-sized run on CPU in ``tmp_path/outputs``."""
    return [
        "+experiment=demo", "trainer.accelerator=cpu", "trainer.precision=32-true", f"data.root={root}", "data.synthetic=null",
        "data.num_workers=0", "data.patch_size=[32,32,32]", "data.val_fraction=0.5", "trainer.check_val_every_n_epoch=1",
        "~callbacks.model_summary", f"paths.log_dir={tmp_path / 'outputs'}", *extra,
    ]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(**extra: str) -> dict[str, str]:
    # One thread per process: two processes on two cores, and no oversubscription stalls.
    return {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()), **extra}


def run(command: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-12000:]
    return result.stdout + result.stderr


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"training ended (exit {process.returncode}) before {path.name} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
        time.sleep(0.1)


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True, map_location="cpu")


def run_folders(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "outputs" / "demo" / "runs").iterdir())


def test_two_process_ddp_matches_single_process(brats_tree, tmp_path):
    folder, cache_dir = tmp_path / "run", tmp_path / "outputs" / "cache"
    command = [sys.executable, "-m", "medseg.train", *tiny(brats_tree, tmp_path, "trainer=ddp", "trainer.devices=2", "trainer.max_epochs=2", f"hydra.run.dir={folder}", f"paths.cache_dir={cache_dir}")]
    run(command, tmp_path, environment())

    # One run folder for both ranks (no second timestamped folder from the re-launched rank 1).
    assert [p.name for p in tmp_path.iterdir() if p.name != "outputs"] == ["run"]
    # One preprocessing cache for both ranks: one folder, one entry per case, no leftovers of a second build.
    (cache,) = cache_dir.iterdir()
    assert sorted(p.name for p in cache.iterdir() if p.is_dir()) == sorted(p.name for p in brats_tree.iterdir() if p.is_dir())
    assert not [p for p in cache.iterdir() if p.name.startswith((".tmp-", ".trash-"))]
    assert not (tmp_path / "outputs" / "demo").exists()
    checkpoints = sorted(p.name for p in (folder / "checkpoints").iterdir())
    assert len(checkpoints) == 2 and "last.ckpt" in checkpoints
    split = json.loads((folder / "split.json").read_text())
    assert len(split["val"]) == 3  # odd: a padding sampler would repeat one case on the second process

    # Every validation case exactly once in the per-case table, and one label file each.
    rows = list(csv.DictReader((folder / "validation" / "evaluation" / "evaluation.csv").open()))
    assert sorted(r["case"] for r in rows if r["region"] == "wt") == sorted(split["val"])
    assert sorted(p.name for p in (folder / "validation").glob("*.nii.gz")) == sorted(f"{c}.nii.gz" for c in split["val"])

    # The same checkpoint evaluated by one process on the same cases gives the same numbers and the same point.
    from omegaconf import OmegaConf

    from medseg.final_evaluation import evaluate_cases

    summary = json.loads((folder / "metrics.json").read_text())
    model, _ = load_model(summary["checkpoint"])
    cfg = OmegaConf.load(folder / "config.yaml")
    by_id = {c["case"]: c for c in find_cases("brats", brats_tree, list(cfg.data.modalities))}
    single = evaluate_cases(model, cfg, [by_id[c] for c in split["val"]], tmp_path / "single")
    for key, value in single.summary["metrics"].items():
        assert value == pytest.approx(summary["metrics"][key], abs=1e-9, nan_ok=True), key
    chosen = json.loads((folder / "operating_point.json").read_text())
    for name, region in single.point.to_dict()["regions"].items():
        assert (chosen["regions"][name]["threshold"], chosen["regions"][name]["min_component_mm3"]) == (region["threshold"], region["min_component_mm3"])
        assert chosen["regions"][name]["score"] == pytest.approx(region["score"], abs=1e-9)
    swept = list(csv.DictReader((folder / "operating_point_sweep.csv").open()))
    assert len(swept) == len(single.sweep_table)
    for written, row in zip(swept, single.sweep_table):
        assert float(written["dice"]) == pytest.approx(row["dice"], abs=1e-6)
        assert float(written["lesion_f1"]) == pytest.approx(row["lesion_f1"], abs=1e-6)


def test_torchrun_processes_share_one_run_folder_and_validate_one_case_on_two(brats_tree, tmp_path):
    # data.val_fraction=0.1 of 6 cases: 1 validation case for 2 processes (rank 1 runs a padding step)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "medseg.train",
               *tiny(brats_tree, tmp_path, "trainer=ddp", "trainer.devices=2", "trainer.max_epochs=2", "evaluate_best=false", "data.val_fraction=0.1")]  # fmt: skip
    output = run(command, tmp_path, environment())
    (folder,) = run_folders(tmp_path)  # no hydra.run.dir given: both workers chose the same folder
    assert (folder / "checkpoints" / "last.ckpt").is_file() and len(json.loads((folder / "split.json").read_text())["val"]) == 1
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output
    validated = [r for r in csv.DictReader((folder / "csv" / "metrics.csv").open()) if r.get("val/dice")]
    assert len(validated) == 2  # every epoch validated, the loss and scores of the one case
    for row in validated:
        assert 0.0 <= float(row["val/dice"]) <= 1.0 and float(row["val/loss"]) > 0.0


def slurm(tmp_path: Path, tasks: int, **extra: str) -> dict[str, str]:
    """The environment of a SLURM batch job, with fake ``srun`` (starts the tasks here) and ``scontrol``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "srun").write_text(
        f"#!{sys.executable}\n"
        "import os, subprocess, sys\n"
        "args = sys.argv[1:]\n"
        "while args[0].startswith('-'): args.pop(0)\n"
        "tasks = [subprocess.Popen(args, env={**os.environ, 'SLURM_PROCID': str(r), 'SLURM_LOCALID': str(r), 'SLURM_NODEID': '0'})\n"
        "         for r in range(int(os.environ['SLURM_NTASKS']))]\n"
        "sys.exit(max(t.wait() for t in tasks))\n"
    )
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/scontrol.log\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    job = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "medseg", "SLURM_NTASKS": str(tasks), "SLURM_NTASKS_PER_NODE": str(tasks),
           "SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1", "SLURM_NODELIST": "localhost", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
           "SLURM_NODEID": "0", "PYTHON": sys.executable}  # fmt: skip
    return environment(**{**job, **extra, "PATH": f"{bin_dir}:{os.environ['PATH']}"})


def test_slurm_tasks_share_the_job_folder_and_a_requeued_job_resumes(brats_tree, tmp_path):
    command = ["bash", str(SBATCH), *tiny(brats_tree, tmp_path, "trainer.max_epochs=8", "evaluate_best=false")]
    env = slurm(tmp_path, tasks=2)
    folder = tmp_path / "outputs" / "demo" / "runs" / "slurm-4242"
    with open(tmp_path / "first.log", "w") as log:
        job = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(folder / "checkpoints" / "last.ckpt", job)
        os.killpg(job.pid, signal.SIGKILL)  # the node fails: every task dies at once, mid-epoch
        job.wait()
    first = (tmp_path / "first.log").read_text()
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in first and "GLOBAL_RANK: 1, MEMBER: 2/2" in first  # rank and size from SLURM
    # Both tasks ran Hydra in the one folder: rank 0 wrote .hydra/ and train.log, rank 1 only its own log.
    assert (folder / ".hydra" / "config.yaml").is_file() and (folder / "train.log").is_file() and (folder / "train_rank1.log").is_file()
    killed = load(folder / "checkpoints" / "last.ckpt")
    steps_per_epoch = killed["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"]  # saved at an epoch's end
    assert killed["global_step"] < 8 * steps_per_epoch

    # SLURM requeues the job: same job id, SLURM_RESTART_COUNT=1, no ckpt_path given.
    output = run(command, tmp_path, {**env, "SLURM_RESTART_COUNT": "1"})
    assert f"Resuming from {folder / 'checkpoints' / 'last'}" in output
    assert load(folder / "checkpoints" / "last.ckpt")["global_step"] == 8 * steps_per_epoch  # no epoch twice, none skipped
    assert run_folders(tmp_path) == [folder]


def test_sigusr1_before_the_time_limit_checkpoints_requeues_and_resumes(brats_tree, tmp_path):
    command = [sys.executable, "-m", "medseg.train", *tiny(brats_tree, tmp_path, "trainer.max_epochs=8", "evaluate_best=false")]
    env = slurm(tmp_path, tasks=1, SLURM_JOB_ID="4243")
    folder = tmp_path / "outputs" / "demo" / "runs" / "slurm-4243"
    with open(tmp_path / "first.log", "w") as log:
        job = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        wait_for(folder / "checkpoints" / "last.ckpt", job)
        job.send_signal(signal.SIGUSR1)  # what #SBATCH --signal=USR1@120 sends
        wait_for(tmp_path / "scontrol.log", job)
        job.kill()  # SLURM stops the job to requeue it
        job.wait()
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4243"]
    (hpc,) = folder.glob("hpc_ckpt_*.ckpt")  # saved by Lightning's SIGUSR1 handler
    newest = max([hpc, folder / "checkpoints" / "last.ckpt"], key=lambda p: p.stat().st_mtime_ns)

    saved = load(newest)
    output = run(command, tmp_path, {**env, "SLURM_RESTART_COUNT": "1"})
    assert f"Resuming from {newest}" in output
    final = load(folder / "checkpoints" / "last.ckpt")
    # The time-limit checkpoint may be from the middle of an epoch, where Lightning's restart of a plain
    # (not stateful) data loader is not step-exact; the requeued job continues and finishes all 8 epochs.
    assert final["epoch"] == 7 and final["global_step"] > saved["global_step"]
    assert run_folders(tmp_path) == [folder]


def test_multirun_with_ddp_runs_each_job_once(brats_tree, tmp_path):
    """Lightning re-launches rank 1 with the parent's arguments; with ``-m`` that would re-run the sweep."""
    command = [sys.executable, "-m", "medseg.train", "-m", *tiny(brats_tree, tmp_path, "trainer=ddp", "trainer.devices=2", "trainer.max_epochs=1", "evaluate_best=false", "seed=1,2")]
    output = run(command, tmp_path, environment())
    (sweep,) = (tmp_path / "outputs" / "demo" / "multiruns").iterdir()
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["0", "1"]
    for job in jobs:
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
        assert (sweep / job / "train_ddp_process_1.log").is_file()  # rank 1 ran in its job's folder
    assert not (tmp_path / "outputs" / "demo" / "runs").exists()  # and did not start runs of its own
    assert output.count("Launching 2 jobs locally") == 1


def test_ddp_on_a_broken_dataset_stops_with_one_message(brats_copy, tmp_path):
    next(brats_copy.glob("*/*_t1.nii.gz")).unlink()
    command = [sys.executable, "-m", "medseg.train", *tiny(brats_copy, tmp_path, "trainer=ddp", "trainer.devices=2")]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=environment())
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "missing modality file 't1'" in output and "python -m medseg.data.check +experiment=demo" in output
    assert "Traceback" not in output  # checked before the second process started
