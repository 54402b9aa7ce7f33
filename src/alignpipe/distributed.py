"""Several processes on one run (`accelerate launch -m alignpipe run RECIPE`, or `alignpipe run --num-processes N`).

accelerate starts the processes and sets up their process group (gloo on CPU, NCCL on GPUs); this module is the
little the loop needs on top of it. The data stages split their work into fixed chunks (a sampling shard, a
batch of held-out prompts): process i computes chunks i, i + N, ..., and the results are gathered on every
process in chunk order, so N processes produce the rows one process produces. Only the main process writes the
run directory; the others compute, and read back what it wrote after a barrier. Training splits each global
batch across the processes and averages their gradients (`optimization/trainer.py`).

With one process (no launcher) every function here is the plain single-process operation.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# DeepSpeed's engine wraps the model, its backward and its optimizer; alignpipe calls the decoder and the head
# itself, so it shards with FSDP (optimization/sharding.py), which has the same two levels
DEEPSPEED_ERROR = ("accelerate config with distributed_type: DEEPSPEED: alignpipe shards with FSDP instead "
                   "(examples/accelerate/fsdp-full-shard.yaml shards as ZeRO-3 does, fsdp-shard-grad-op.yaml as ZeRO-2)")


def free_port() -> int:
    """A TCP port nobody listens on now: the rendezvous port of a single-machine launch (torchrun's fixed default,
    29500, is taken while another launch on the machine runs or has just ended)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def world_size() -> int:
    """How many processes run this recipe (accelerate's launcher sets WORLD_SIZE; 1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def device() -> Any:
    """This process's device: its GPU (cuda:LOCAL_RANK) where there are GPUs, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def init() -> None:
    """Join the launcher's process group through accelerate (gloo on CPU); nothing with one process."""
    if world_size() > 1:
        import torch
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())


def barrier() -> None:
    if world_size() > 1:
        import torch.distributed as dist

        dist.barrier()


def all_gather(obj: T) -> list[T]:
    """`obj` of every process, by rank (picklable objects; CPU tensors inside travel too)."""
    if world_size() == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def main_first() -> Iterator[None]:
    """The main process runs the block first (e.g. it fills a shared cache), then the others run it."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def map_chunks(items: list[T], chunk_size: int, compute: Callable[[list[T], int], list[R]]) -> list[R]:
    """`compute(chunk, chunk_index)` over `items` cut into chunks of `chunk_size`, the results concatenated in
    chunk order. With N processes, process i computes chunks i, i + N, ... and every process gets all results.
    The chunks do not depend on N, so `compute` seeded by its chunk index gives the same rows for any N."""
    chunks = [items[start : start + chunk_size] for start in range(0, len(items), max(chunk_size, 1))]
    n, me = world_size(), rank()
    mine = {index: compute(chunks[index], index) for index in range(me, len(chunks), n)}
    results: dict[int, list[R]] = {}
    for part in all_gather(mine):
        results.update(part)
    return [row for index in range(len(chunks)) for row in results[index]]


def local_share(indices: list[int]) -> tuple[list[int], float]:
    """This process's part of a global batch and the weight of its loss.

    Each process takes a contiguous slice; its mean loss is weighted by (its rows x N / the batch's rows), so
    that the mean of the N weighted losses (what averaging gradients computes) is the mean loss over the whole
    batch, also when the batch does not split evenly. A process left with no rows takes the batch's first row
    at weight 0 (every process must run the same forward/backward to stay in step)."""
    n, me = world_size(), rank()
    if n == 1:
        return indices, 1.0
    size = -(-len(indices) // n)
    mine = indices[me * size : (me + 1) * size]
    if not mine:
        return indices[:1], 0.0
    return mine, len(mine) * n / len(indices)


def average_gradients(params: list[Any]) -> None:
    """Average the gradients of `params` over the processes (one all-reduce of the flattened gradients: the
    arithmetic of DistributedDataParallel, applied after backward). Parameters without a gradient count as 0."""
    if world_size() == 1 or not params:
        return
    import torch
    import torch.distributed as dist

    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= world_size()
    at = 0
    for p, g in zip(params, grads, strict=True):
        size = g.numel()
        p.grad = flat[at : at + size].view_as(g).to(g.dtype)
        at += size
