"""Several processes (`torchrun --nproc_per_node N train.py ...`): torch's FSDP (fully_shard) shards every
model, and these keep the math global: each process's share of the global batch's loss tokens, and sums, means
and maxima over every process. In a single process each is the identity (or a no-op)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def init_distributed(device: str) -> tuple[int, int]:
    """Under torchrun, join the process group (NCCL on GPUs, gloo on CPU). Returns (rank, world size)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "gloo"
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            backend = "nccl"
        dist.init_process_group(backend)
    return world_info()


def world_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier():
    if dist.is_initialized():
        dist.barrier()


def finish_distributed():
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce(x: torch.Tensor, op=None) -> torch.Tensor:
    """Sum (or `op`) over processes; the identity in a single process."""
    if world_info()[1] > 1:
        x = x.clone()
        dist.all_reduce(x, op=op or dist.ReduceOp.SUM)
    return x


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of x (N,) over every process's elements: () (sum over all / count over all)."""
    return all_reduce(x.sum()) / all_reduce(torch.tensor(float(len(x)), device=x.device))


def global_max(x: torch.Tensor) -> torch.Tensor:
    """The largest element of x over every process, as float: ()."""
    return all_reduce(x.max().float(), dist.ReduceOp.MAX)


def token_share(targets: torch.Tensor) -> float:
    """(this process's loss tokens / all processes' loss tokens) * world size, for the loss targets (N,) of
    this process's part of a batch. Scaling a per-token mean by it makes FSDP's gradient average equal the
    gradient of the global batch's per-token mean."""
    world = world_info()[1]
    if world == 1:
        return 1.0
    n = torch.tensor(float(len(targets)), device=targets.device)  # NCCL reduces device tensors only
    return (n * world / all_reduce(n)).item()


def shard(model):
    """FSDP2: each transformer block its own unit, then the rest (embedding, final norm, head)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)


def global_values(terms: dict, shares: dict) -> dict[str, float]:
    """Every loss term's value over the global batch: each process's per-token mean {name: ()} weighted by its
    token share (shares[name], else 1), summed over the processes (one all-reduce), / world size."""
    names = list(terms)
    local = torch.stack([terms[k].detach().float() * shares.get(k, 1.0) for k in names])
    world = world_info()[1]
    return {k: v / world for k, v in zip(names, all_reduce(local).tolist())}
