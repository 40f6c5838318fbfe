"""Runs trained by several processes: one run folder for all of them, and resuming after a requeue.

Three ways start the processes, and each must agree on one run folder without talking to the others:

* Lightning itself (``trainer=ddp`` from a plain ``python -m medseg.train``): rank 0 re-launches the
  script for the other ranks and passes its ``hydra.run.dir``. In a Hydra multirun (``-m``) Lightning's
  command would re-run the whole sweep in every child; :func:`patch_lightning_relaunch` makes a child run
  only the sweep job of its parent.
* ``srun`` under SLURM (``scripts/slurm/train.sbatch``, ``hydra/launcher=slurm``): every task composes
  the config itself, so the folder name comes from the job id (:func:`run_id`), which also stays the same
  when the job is requeued. A requeued job resumes from its newest checkpoint (:func:`resume_checkpoint`).
* ``torchrun``: the folder name comes from the rendezvous id or, when there is none, from the start time
  of the torchrun agent that all local workers share.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger("medseg")

TIME_FORMAT = "%Y-%m-%d_%H-%M-%S"  # the same as Hydra's default run folders
# Job names with which Lightning treats a SLURM allocation as interactive (not launched by srun).
SLURM_INTERACTIVE_NAMES = ("bash", "interactive")
# Hydra flags that select the config and must reach the re-launched processes as they were given.
HYDRA_CONFIG_FLAGS = ("--config-name", "-cn", "--config-path", "-cp", "--config-dir", "-cd")
# Set by Lightning's launcher in the launching process; left behind, the next run of a multirun would take
# them for an external launcher's and start no processes of its own.
LAUNCHER_ENVIRONMENT = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def slurm_job_id(env: Mapping[str, str] | None = None) -> str | None:
    """The SLURM job id of a batch or ``srun`` task (``<array job>_<task>`` for arrays), else ``None``.

    ``None`` too in an interactive allocation (job name ``bash``/``interactive``), where Lightning does not
    use the SLURM environment either and several runs may share the job.
    """
    env = os.environ if env is None else env
    if "SLURM_JOB_ID" not in env or "SLURM_NTASKS" not in env or env.get("SLURM_JOB_NAME") in SLURM_INTERACTIVE_NAMES:
        return None
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env["SLURM_JOB_ID"]


def process_rank(env: Mapping[str, str] | None = None, devices_per_node: Any = None) -> int:
    """Global rank of this process as its launcher set it, before any process group exists (0 if alone).

    SLURM tasks: ``SLURM_PROCID``; torchrun: ``RANK``; ranks started by Lightning (its own launcher, or processes
    started by hand on each node): ``NODE_RANK * devices_per_node + LOCAL_RANK``, as Lightning numbers them.

    Args:
        env: the environment (``os.environ`` by default).
        devices_per_node: ``trainer.devices`` (an int, a list of devices, ``"auto"`` or ``-1``); needed on nodes
            after the first only, where ``LOCAL_WORLD_SIZE`` or ``WORLD_SIZE`` / ``NUM_NODES`` does not say it.
    """
    env = os.environ if env is None else env
    if slurm_job_id(env) is not None:
        return int(env.get("SLURM_PROCID", "0"))
    if "RANK" in env:
        return int(env["RANK"])
    node, local = int(env.get("NODE_RANK", env.get("GROUP_RANK", "0"))), int(env.get("LOCAL_RANK", "0"))
    if node == 0:
        return local
    return node * _devices_per_node(env, devices_per_node) + local


def _devices_per_node(env: Mapping[str, str], devices: Any) -> int:
    """Processes per node of a Lightning run: ``LOCAL_WORLD_SIZE`` where the launcher sets it, else
    ``trainer.devices`` (an int, a list of devices, or ``"auto"``/``-1``: every visible GPU)."""
    if env.get("LOCAL_WORLD_SIZE"):
        return int(env["LOCAL_WORLD_SIZE"])
    if devices is not None and not isinstance(devices, (str, int)):
        return len(devices)  # a list of device indices
    if str(devices) in ("auto", "-1"):
        return max(1, torch.cuda.device_count())
    if devices is not None and str(devices).isdigit() and int(devices) > 0:
        return int(devices)
    raise ValueError(f"NODE_RANK={env.get('NODE_RANK', env.get('GROUP_RANK'))} without the number of processes per node: "
                     "set trainer.devices (or LOCAL_WORLD_SIZE) so that every process has its own global rank")


def rank_zero_value(value: Any, devices_per_node: Any = None) -> Any:
    """``value`` in the process of global rank 0, else ``None`` (the ``${medseg.rank_zero:...}`` resolver)."""
    return value if process_rank(devices_per_node=devices_per_node) == 0 else None


def group_rank_and_size() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_objects(items: list[Any]) -> list[Any]:
    """Every process's ``items``, concatenated in rank order (``items`` themselves without a process group)."""
    rank, world = group_rank_and_size()
    if world == 1:
        return items
    gathered: list[list[Any] | None] = [None] * world
    dist.all_gather_object(gathered, items)
    return [item for part in gathered for item in (part or [])]


def raise_if_any_failed(errors: list[str], what: str) -> None:
    """Raise on every process when any process met errors, so that none is left waiting in a collective for one
    that stopped (a collective: call it from every process)."""
    errors = gather_objects(errors)
    if errors:
        raise RuntimeError(f"{what} failed: {'; '.join(errors[:3])}{' ...' if len(errors) > 3 else ''}")


def on_rank_zero(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` in the process of rank 0, its result broadcast to every process; if it raises, every
    process raises (a collective: call it from every process)."""
    rank, world = group_rank_and_size()
    result: list[Any] = [None, None]  # (value, error message)
    if rank == 0:
        try:
            result[0] = fn(*args, **kwargs)
        except Exception as err:  # passed to the other processes, then raised here as well
            if world == 1:
                raise
            result[1] = f"{type(err).__name__}: {err}"
    if world > 1:
        dist.broadcast_object_list(result, src=0)
    if result[1] is not None:
        raise RuntimeError(f"rank 0 failed in {getattr(fn, '__name__', fn)}: {result[1]}")
    return result[0]


def rank_suffix(devices_per_node: Any = None) -> str:
    """``""`` for global rank 0, ``"_rank<r>"`` for the others (``${medseg.rank_suffix:${trainer.devices}}``: their
    log files)."""
    rank = process_rank(devices_per_node=devices_per_node)
    return f"_rank{rank}" if rank else ""


def process_start_time(pid: int) -> float | None:
    """Start time (epoch seconds) of a process, from ``/proc`` (Linux); ``None`` where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of stat: start time in clock ticks
    except (OSError, StopIteration, IndexError, ValueError):
        return None


def run_id(env: Mapping[str, str] | None = None) -> str:
    """Name of a run folder that every process of one run computes alike (the ``${medseg.run_id:}`` resolver).

    ``slurm-<job id>`` under SLURM (stable across requeues), ``torchrun-<rendezvous id>`` under torchrun
    with ``--rdzv-id``, the start time of the torchrun agent under ``torchrun --standalone``, else now.
    """
    env = os.environ if env is None else env
    job = slurm_job_id(env)
    if job is not None:
        return f"slurm-{job}"
    if "TORCHELASTIC_RUN_ID" in env:
        if env["TORCHELASTIC_RUN_ID"] not in ("", "none"):
            return f"torchrun-{env['TORCHELASTIC_RUN_ID']}"
        agent = os.getppid()  # local workers are children of one torchrun agent
        started = process_start_time(agent)
        return time.strftime(TIME_FORMAT, time.localtime(started)) if started is not None else f"torchrun-{agent}"
    return time.strftime(TIME_FORMAT)


def resume_checkpoint(ckpt_path: str | None, output_dir: str | Path, env: Mapping[str, str] | None = None) -> str | None:
    """The checkpoint ``trainer.fit`` should start from.

    ``ckpt_path=last`` (and, in a requeued SLURM job, an unset ``ckpt_path``) means the newest of this run
    folder's ``checkpoints/last*.ckpt`` and of the ``hpc_ckpt_*.ckpt`` Lightning saves when SLURM signals the
    end of the time limit; ``None`` (start afresh) when there is none yet. Other values pass through.
    """
    env = os.environ if env is None else env
    requeued = slurm_job_id(env) is not None and int(env.get("SLURM_RESTART_COUNT", "0") or 0) > 0
    if ckpt_path != "last" and not (ckpt_path is None and requeued):
        return ckpt_path
    folder = Path(output_dir)
    candidates = [*folder.glob("hpc_ckpt_*.ckpt"), *(folder / "checkpoints").glob("last*.ckpt")]
    if not candidates:
        log.info("No checkpoint in %s yet: training starts from the beginning.", folder)
        return None
    newest = max(candidates, key=lambda p: p.stat().st_mtime_ns)
    log.info("Resuming from %s", newest)
    return str(newest)


def relaunch_command(argv: Sequence[str], task_overrides: Sequence[str], output_dir: str, local_rank: int) -> list[str]:
    """Command line for rank ``local_rank`` of one sweep job: that job's overrides, in its folder, no ``-m``.

    Args:
        argv: the parent's ``sys.argv[1:]``; only the flags that choose the config are kept from it.
        task_overrides: the job's own overrides (``HydraConfig.get().overrides.task``).
        output_dir: the job's output folder, which the child uses as its ``hydra.run.dir``.
    """
    flags: list[str] = []
    args = list(argv)
    for i, arg in enumerate(args):
        name = arg.split("=", 1)[0]
        if name in HYDRA_CONFIG_FLAGS:
            flags += [arg] if "=" in arg else args[i : i + 2]
    return [
        *flags,
        *task_overrides,
        f'hydra.run.dir="{output_dir}"',
        f"hydra.job.name=train_ddp_process_{local_rank}",
        "hydra.output_subdir=null",  # the parent already wrote .hydra/
    ]


def _sweep_aware_subprocess_cmd(local_rank: int) -> tuple[list[str], str]:
    """Replacement for Lightning's ``_hydra_subprocess_cmd`` that also handles Hydra multirun jobs."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from lightning.fabric.strategies.launchers import subprocess_script

    command, cwd = subprocess_script._hydra_subprocess_cmd(local_rank)
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return command, cwd
    prefix = command[: len(command) - len(sys.argv[1:]) - 3]  # python [-m module | script]
    return [*prefix, *relaunch_command(sys.argv[1:], hydra_cfg.overrides.task, hydra_cfg.runtime.output_dir, local_rank)], cwd


def patch_lightning_relaunch() -> None:
    """Make Lightning's re-launched DDP ranks of a Hydra multirun job run that job, not the whole sweep."""
    from lightning.pytorch.strategies.launchers import subprocess_script

    subprocess_script._hydra_subprocess_cmd = _sweep_aware_subprocess_cmd


@contextmanager
def one_run_per_process_group() -> Iterator[None]:
    """Let DDP runs follow one another in one process (Hydra multirun): each ends its process group and
    takes back the launcher's environment variables."""
    before = {key: os.environ.get(key) for key in LAUNCHER_ENVIRONMENT}
    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
