"""torchrun/DDP helpers. Without an initialised process group every helper is the single-process identity,
so the same training code runs on a laptop, one GPU or many."""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def init_from_env(device: str) -> tuple[bool, int]:
    """Initialise the process group when launched by torchrun (``WORLD_SIZE`` > 1); returns (ddp, local_rank)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_dist():
        return is_dist(), int(os.environ.get("LOCAL_RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device == "cuda" else "gloo"
    if device == "cuda":
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return True, local


def barrier():
    if is_dist():
        dist.barrier()


def cleanup():
    if is_dist():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (float64 on CPU in, same out). Works with gloo and nccl."""
    if not is_dist():
        return t
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    x = t.to(dev).clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x.to(t.device)


def any_rank_(flag: torch.Tensor) -> torch.Tensor:
    """In place: true on every rank where it is true on any (a device tensor; queued, the host does not wait)."""
    if is_dist():
        as_int = flag.to(torch.int32)
        dist.all_reduce(as_int, op=dist.ReduceOp.MAX)
        flag.copy_(as_int.bool())
    return flag


def all_gather_objects(obj) -> list:
    """List of ``obj`` from every rank (rank order)."""
    if not is_dist():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
