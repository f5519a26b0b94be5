"""One device picker for train.py, eval.py and the benchmark, with clear errors; and the
process group of a torchrun launch."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def pick_device(name: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype | None]:
    """(device, autocast dtype or None) from --device and --dtype.

    auto: this process's CUDA device (LOCAL_RANK under torchrun) when there is one, else the
    CPU. dtype auto: bfloat16 autocast on CUDA, float32 on the CPU.
    """
    if name == "auto":
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: only cpu and cuda are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: this machine has no usable CUDA device (torch {torch.__version__}"
                             f"{'' if torch.version.cuda else ', a CPU-only build'}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"--dtype must be auto, float32 or bfloat16, got {dtype!r}")
    return device, (torch.bfloat16 if dtype == "bfloat16" else None)


def setup_distributed():
    """(process rank, world size); initialises torch.distributed when launched by torchrun.
    Gloo carries CPU tensors and NCCL CUDA tensors, so small CPU counters can be reduced too."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank() if world > 1 else 0), world


def wrap_ddp(model, device: torch.device, world: int):
    """The model as DistributedDataParallel when several processes train it, else as it is."""
    if world == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def sum_over_processes(t: torch.Tensor, world: int) -> torch.Tensor:
    """t summed over every process (in place; a no-op alone)."""
    if world > 1:
        dist.all_reduce(t)
    return t


def sync_unless(ddp_model, world: int, accumulating: bool):
    """DDP's no_sync() for a micro-batch whose gradient is still being accumulated."""
    import contextlib
    return ddp_model.no_sync() if world > 1 and accumulating else contextlib.nullcontext()
