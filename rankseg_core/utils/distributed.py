"""DDP helpers: set-up from torchrun's environment, rank-0 writing, reductions.

`torchrun --nproc_per_node N -m rankseg_cli train ...` sets RANK / LOCAL_RANK / WORLD_SIZE /
MASTER_ADDR / MASTER_PORT; without them everything runs as a single process (world 1) and
every helper here is a no-op. gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from rankseg_core.errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(device: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:<local_rank> if available, else cpu; 'cuda' -> cuda:<local_rank>."""
    if isinstance(device, torch.device):
        return device
    name = (device or "auto").strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
        if name == "cuda":
            name = f"cuda:{local_rank}"
        index = int(name.split(":", 1)[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif name != "cpu":
        raise UserError(f"--device {device!r}: use cpu, cuda, cuda:N or auto")
    return torch.device(name)


def env_info() -> DistInfo:
    """Rank / world size from torchrun's environment variables (world 1 without them)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", str(rank)))
    return DistInfo(rank=rank, local_rank=local, world_size=world)


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun described (no-op for a single process)."""
    info = env_info()
    if info.world_size <= 1:
        return DistInfo()
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, rank=info.rank, world_size=info.world_size)
    return info


def current() -> DistInfo:
    """Rank / world of an initialised process group (world 1 otherwise)."""
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return DistInfo(rank=rank, local_rank=int(os.environ.get("LOCAL_RANK", rank)),
                        world_size=dist.get_world_size())
    return DistInfo()


def is_main() -> bool:
    return current().is_main


def barrier() -> None:
    if current().enabled:
        dist.barrier()


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over processes (a copy; the input is untouched). A sync point."""
    if not current().enabled:
        return values
    out = values.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / current().world_size


def all_reduce_sum_np(array: np.ndarray, device: torch.device | None = None) -> np.ndarray:
    """Sum a numpy array (e.g. a K x K confusion matrix) over processes, exactly (int64)."""
    if not current().enabled:
        return array
    dev = device if device is not None and dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.from_numpy(np.ascontiguousarray(array)).to(dev)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().numpy().astype(array.dtype, copy=False)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's `obj` (picklable), in rank order."""
    if not current().enabled:
        return [obj]
    out: list[Any] = [None] * current().world_size
    dist.all_gather_object(out, obj)
    return out
