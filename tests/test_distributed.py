"""One run folder per multi-process run, resuming a requeued job, and re-launching DDP ranks of a sweep job."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from medseg.config import compose
from medseg.distributed import process_rank, relaunch_command, resume_checkpoint, run_id, slurm_job_id

SLURM = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "8", "SLURM_PROCID": "3", "SLURM_JOB_NAME": "medseg"}


def test_run_id_under_slurm_is_the_job_id_for_every_task():
    assert run_id(SLURM) == "slurm-4242"
    assert run_id({**SLURM, "SLURM_PROCID": "7", "SLURM_RESTART_COUNT": "2"}) == "slurm-4242"
    assert run_id({**SLURM, "SLURM_ARRAY_JOB_ID": "4200", "SLURM_ARRAY_TASK_ID": "5"}) == "slurm-4200_5"


def test_process_rank_from_each_launcher():
    assert process_rank({}) == 0
    assert process_rank(SLURM) == 3
    assert process_rank({"RANK": "5", "LOCAL_RANK": "1"}) == 5  # torchrun
    assert process_rank({"LOCAL_RANK": "1", "NODE_RANK": "0"}) == 1  # started by Lightning


def test_hand_started_nodes_get_distinct_global_ranks_as_lightning_numbers_them():
    # 2 nodes x 4 processes, started by hand or by Lightning on each node: node k's ranks are 4k .. 4k+3
    ranks = [process_rank({"NODE_RANK": str(n), "LOCAL_RANK": str(r)}, devices_per_node=4) for n in range(2) for r in range(4)]
    assert ranks == list(range(8))
    assert process_rank({"NODE_RANK": "1"}, devices_per_node=4) == 4  # node 1's first process, before it launches the rest
    assert process_rank({"NODE_RANK": "1", "LOCAL_RANK": "1"}, devices_per_node=[0, 2, 3]) == 4  # a list of devices
    assert process_rank({"GROUP_RANK": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}) == 5
    with pytest.raises(ValueError, match="trainer.devices"):  # never a guess that two nodes could share
        process_rank({"NODE_RANK": "1", "LOCAL_RANK": "0"})


def test_log_names_and_hydra_folder_follow_the_global_rank(monkeypatch):
    from omegaconf import OmegaConf

    from medseg.config import register_resolvers

    register_resolvers()
    node = OmegaConf.create({"trainer": {"devices": 2}, "name": "train${medseg.rank_suffix:${trainer.devices}}",
                             "sub": "${medseg.rank_zero:.hydra,${trainer.devices}}"})
    for env, name, sub in ((("0", "0"), "train", ".hydra"), (("0", "1"), "train_rank1", None), (("1", "0"), "train_rank2", None), (("1", "1"), "train_rank3", None)):
        monkeypatch.setenv("NODE_RANK", env[0])
        monkeypatch.setenv("LOCAL_RANK", env[1])
        assert (node.name, node.sub) == (name, sub)


def test_run_id_in_an_interactive_allocation_is_a_time():
    # Job name bash/interactive: Lightning ignores SLURM there, and several runs share the job id.
    for env in ({**SLURM, "SLURM_JOB_NAME": "bash"}, {**SLURM, "SLURM_JOB_NAME": "interactive"}, {"SLURM_JOB_ID": "1"}):
        assert slurm_job_id(env) is None
        assert not run_id(env).startswith("slurm-")
    assert time.strptime(run_id({}), "%Y-%m-%d_%H-%M-%S")


def test_run_id_under_torchrun():
    assert run_id({"TORCHELASTIC_RUN_ID": "exp7"}) == "torchrun-exp7"
    # --standalone: no rendezvous id, so the workers share the start time of their parent, the agent.
    env = {**os.environ, "TORCHELASTIC_RUN_ID": "none"}
    code = "from medseg.distributed import run_id; print(run_id())"
    names = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout.strip() for _ in range(2)]
    assert names[0] == names[1] and time.strptime(names[0], "%Y-%m-%d_%H-%M-%S")


def test_hydra_run_folder_uses_run_id(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "777")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_JOB_NAME", "medseg")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from medseg.config import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose("train", ["+experiment=demo"], return_hydra_config=True)
    assert cfg.hydra.run.dir.endswith("outputs/demo/runs/slurm-777")


def _touch(path, mtime):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    os.utime(path, ns=(mtime, mtime))


def test_resume_checkpoint_takes_the_newest(tmp_path):
    assert resume_checkpoint("last", tmp_path) is None  # nothing yet: start from the beginning
    _touch(tmp_path / "checkpoints" / "last.ckpt", 2_000_000_000)
    _touch(tmp_path / "hpc_ckpt_1.ckpt", 1_000_000_000)
    assert resume_checkpoint("last", tmp_path) == str(tmp_path / "checkpoints" / "last.ckpt")
    _touch(tmp_path / "hpc_ckpt_2.ckpt", 3_000_000_000)  # saved when SLURM signalled the time limit
    assert resume_checkpoint("last", tmp_path) == str(tmp_path / "hpc_ckpt_2.ckpt")
    # Other values pass through; an unset ckpt_path resumes only in a requeued SLURM job.
    assert resume_checkpoint("/x/epoch3.ckpt", tmp_path) == "/x/epoch3.ckpt"
    assert resume_checkpoint(None, tmp_path, env={}) is None
    assert resume_checkpoint(None, tmp_path, env=SLURM) is None
    assert resume_checkpoint(None, tmp_path, env={**SLURM, "SLURM_RESTART_COUNT": "1"}) == str(tmp_path / "hpc_ckpt_2.ckpt")


def test_relaunch_command_runs_one_sweep_job():
    argv = ["-m", "--config-name", "train", "+experiment=demo", "seed=1,2,3", "trainer=ddp", "-cp=/conf"]
    command = relaunch_command(argv, ["+experiment=demo", "seed=2", "trainer=ddp"], "/runs/multi/1", local_rank=1)
    assert command == [
        "--config-name", "train", "-cp=/conf",
        "+experiment=demo", "seed=2", "trainer=ddp",
        'hydra.run.dir="/runs/multi/1"', "hydra.job.name=train_ddp_process_1", "hydra.output_subdir=null",
    ]  # fmt: skip


def test_slurm_launcher_config_follows_the_trainer():
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from medseg.config import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose("train", ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.tasks_per_node, launcher.gpus_per_node, launcher.nodes) == (4, 4, 2)
    assert launcher.max_num_timeout > 0 and launcher.signal_delay_s > 0 and launcher.timeout_min > 0


@pytest.mark.slow
def test_slurm_launcher_submits_one_task_per_device(tmp_path):
    """Through Hydra and submitit up to sbatch: a fake sbatch keeps the job script it was given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\ncp "$1" {tmp_path}/job.sh\necho "no cluster here" >&2\nexit 1\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")  # submitit looks for srun before it submits
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).chmod(0o755)
    command = [sys.executable, "-m", "medseg.train", "-m", "hydra/launcher=slurm", "+experiment=demo", "trainer=ddp", "trainer.devices=4",
               "trainer.num_nodes=2", "hydra.launcher.partition=gpu", f"paths.log_dir={tmp_path / 'outputs'}"]  # fmt: skip
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    script = (tmp_path / "job.sh").read_text()
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu", "--time=1440", "--signal=USR2@120", "--requeue"):
        assert f"#SBATCH {line}\n" in script, line
    assert "srun" in script


def test_sbatch_template_matches_what_lightning_checks():
    from medseg.config import CONFIG_DIR

    script = (CONFIG_DIR.parent / "scripts" / "slurm" / "train.sbatch").read_text()
    for line in ("--signal=USR1@", "--requeue", "--ntasks-per-node=", "--gpus-per-node="):
        assert f"#SBATCH {line}" in script, line
    # Lightning requires devices == tasks per node and num_nodes == nodes; the script takes both from SLURM.
    assert 'trainer.devices="${DEVICES}"' in script and 'trainer.num_nodes="${NODES}"' in script
    assert subprocess.run(["bash", "-n", str(CONFIG_DIR.parent / "scripts" / "slurm" / "train.sbatch")]).returncode == 0
    assert compose("train", ["trainer=ddp", "trainer.devices=4"]).trainer.sync_batchnorm is True


def test_rank_zero_helpers_without_a_process_group():
    from medseg.distributed import gather_objects, on_rank_zero, raise_if_any_failed

    assert gather_objects([1, 2]) == [1, 2] and on_rank_zero(lambda a, b: a + b, 2, b=3) == 5
    raise_if_any_failed([], "nothing")
    with pytest.raises(RuntimeError, match="the evaluation failed: case1: bad"):
        raise_if_any_failed(["case1: bad"], "the evaluation")
    with pytest.raises(ZeroDivisionError):  # one process: the error itself
        on_rank_zero(lambda: 1 / 0)
