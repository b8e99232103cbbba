"""What the machine and the launcher give us: device, precision, world size.

Two traps this module exists for (seen with accelerate 1.15 / torch 2.13):
* On a machine without CUDA, accelerate must be told it is on CPU
  (``use_cpu``), or ``accelerate launch --multi_gpu --num_processes N`` runs
  N independent single-process trainings that never talk to each other.
* ``accelerate launch --num_processes N`` without ``--multi_gpu`` on a CPU
  machine starts one process and says nothing. Set
  ``dist.expected_world_size=N`` to make fttrain refuse that.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from fttrain.errors import FttrainError

# Rendezvous port of a Slurm job without a fixed one: PORT_BASE + job id % PORT_SPAN,
# so jobs sharing a node do not clash (the sbatch templates compute the same).
PORT_BASE, PORT_SPAN = 15000, 20000


class LaunchError(FttrainError, RuntimeError):
    pass


def is_main_process() -> bool:
    """Global rank 0, the process that writes the run's shared files: torch.distributed's
    rank once a process group exists, else the launcher's RANK (one process: True)."""
    if "torch" in sys.modules:  # no process group can exist before torch is imported
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class Runtime:
    use_cpu: bool
    precision: str  # bf16 | fp16 | fp32, resolved


def resolve_precision(requested: str, on_gpu: bool) -> str:
    import torch

    if requested == "auto":
        return "bf16" if on_gpu and torch.cuda.is_bf16_supported() else "fp32"
    if requested == "bf16" and on_gpu and not torch.cuda.is_bf16_supported():
        raise LaunchError(
            f"precision=bf16 but {torch.cuda.get_device_name()} has no bf16 support; use precision=fp16 or fp32"
        )
    if requested == "fp16" and not on_gpu:
        raise LaunchError("precision=fp16 needs a GPU (CPU autocast has no fp16 loss scaling); use fp32 or bf16")
    return requested


def detect_runtime(precision_cfg) -> Runtime:
    import torch

    on_gpu = torch.cuda.is_available()
    requested = precision_cfg.dtype.value if hasattr(precision_cfg.dtype, "value") else str(precision_cfg.dtype)
    return Runtime(
        use_cpu=not on_gpu,
        precision=resolve_precision(requested, on_gpu),
    )


def check_world_size(realised: int, launcher_world_size: int, dist_cfg) -> None:
    """The world size we train with must be what the launcher started
    (``launcher_world_size``: its WORLD_SIZE, see ``fttrain.plan.Topology``)."""
    import torch

    if realised != launcher_world_size:
        raise LaunchError(
            f"training world size is {realised} but the launcher started WORLD_SIZE={launcher_world_size} "
            "processes: they would train independently. On CPU use "
            "`accelerate launch --multi_gpu --num_processes N` (fttrain sets use_cpu)."
        )
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        pg = torch.distributed.get_world_size()
        if pg != realised:
            raise LaunchError(f"process group has {pg} ranks but the trainer sees {realised}")
    elif realised > 1:
        raise LaunchError(f"world size {realised} but no process group was initialised")
    if dist_cfg.expected_world_size is not None and realised != dist_cfg.expected_world_size:
        raise LaunchError(
            f"dist.expected_world_size={dist_cfg.expected_world_size} but {realised} process(es) started. "
            "`accelerate launch --num_processes N` on a CPU machine needs --multi_gpu to start N processes."
        )


def peak_memory_bytes(use_cpu: bool) -> int:
    """Peak GPU memory allocated by torch, or on CPU the process's peak RSS."""
    import torch

    if not use_cpu and torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def rss_bytes(field: str = "VmRSS") -> int:
    """This process's resident memory now (Linux; 0 where /proc is missing). field="VmHWM":
    its peak, which unlike ru_maxrss does not carry the parent's peak into a child started by
    fork and exec (Linux keeps the larger across exec)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def library_versions() -> dict:
    """The installed versions of the libraries a run is built on (run_info.json, eval_harness.json)."""
    import importlib.metadata

    import accelerate
    import peft
    import torch
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "peft": peft.__version__, "accelerate": accelerate.__version__}
    try:  # the installed version, without importing TRL into a run that does not use it
        versions["trl"] = importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError:
        pass
    return versions


def distributed_env_from_slurm() -> None:
    """Under ``srun`` with one task per rank (Hydra's submitit launcher with
    tasks_per_node > 1), torch.distributed's variables from Slurm's. A launcher
    that set RANK itself (accelerate, torchrun) is left alone."""
    ntasks = int(os.environ.get("SLURM_NTASKS") or 1)
    if ntasks < 2 or "RANK" in os.environ or "SLURM_PROCID" not in os.environ or "SLURM_STEP_ID" not in os.environ:
        return
    import subprocess

    nodes = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                           capture_output=True, text=True, check=True).stdout.split()
    per_node = ntasks // max(1, int(os.environ.get("SLURM_NNODES") or 1))
    os.environ.update({
        "RANK": os.environ["SLURM_PROCID"],
        "WORLD_SIZE": str(ntasks),
        "LOCAL_RANK": os.environ.get("SLURM_LOCALID", "0"),
        "LOCAL_WORLD_SIZE": str(per_node),
        "MASTER_ADDR": nodes[0],
        # One port per job, so trials sharing a node do not collide.
        "MASTER_PORT": os.environ.get("MASTER_PORT") or str(PORT_BASE + int(os.environ["SLURM_JOB_ID"]) % PORT_SPAN),
    })
