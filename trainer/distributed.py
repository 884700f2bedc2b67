"""torchrun/DDP plumbing: process group setup, rank queries, weight agreement checks."""
from __future__ import annotations

import hashlib
import os

import torch
import torch.distributed as dist

from search_spaces.errors import ConfigError


def world_size() -> int:
    """Number of processes (1 without torchrun)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else int(
        os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank (0 without torchrun)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """True on the process that writes files and prints progress."""
    return rank() == 0


def resolve_device(device: str, *, available: bool = True) -> torch.device:
    """auto -> cuda if available, else cpu; anything else as torch spells it (a ConfigError if it is no device, or
    with `available`, if it cannot run here)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"{device!r} is not a device (auto, cpu, cuda or cuda:N)", field="device") from None
    if not available:
        return dev
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{device!r}: CUDA is not available here (torch.cuda.is_available() is False)",
                          field="device")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"{device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)", field="device")
    return dev


def setup(device: str) -> torch.device:
    """Initialise the process group under torchrun (NCCL on CUDA, gloo on CPU) and pick this rank's device."""
    device = str(resolve_device(device))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if device.startswith("cuda"):
            torch.cuda.set_device(local)
            device = f"cuda:{local}"
        dist.init_process_group(backend=backend)
    return torch.device(device)


def cleanup() -> None:
    """Tear the process group down."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def state_digest(model: torch.nn.Module) -> str:
    """A SHA-256 of the model's parameters and buffers (to prove that DDP ranks agree)."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def broadcast_buffers(model: torch.nn.Module, src: int = 0) -> None:
    """Make every rank's buffers (BN running statistics) equal to rank `src`'s.

    DDP broadcasts buffers before each forward, so after the last forward of an epoch they differ by
    one local update; syncing them makes every rank validate and checkpoint the same model.
    """
    if world_size() == 1 or not dist.is_initialized():
        return
    for b in model.buffers():
        dist.broadcast(b.data, src)


def average_gradients(module: torch.nn.Module) -> None:
    """All-reduce (mean) the gradients of a module that is not wrapped in DDP."""
    if world_size() == 1 or not dist.is_initialized():
        return
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size()


def gather_strings(s: str) -> list[str]:
    """All ranks' strings, on every rank."""
    if world_size() == 1 or not dist.is_initialized():
        return [s]
    out: list[str] = [""] * world_size()
    dist.all_gather_object(out, s)
    return out


def barrier() -> None:
    """Wait until every rank gets here (no-op without a process group)."""
    if world_size() > 1 and dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank `src`'s picklable object, on every rank (decisions such as when to stop must agree)."""
    if world_size() == 1 or not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]
