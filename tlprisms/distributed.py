"""``explain_task`` on several processes, GPUs or machines, with ``torch.distributed``.

Launch the same script on every process with ``torchrun`` (or ``accelerate launch``, which
calls it), initialise the process group, and call ``explain_task`` as usual::

    torchrun --nproc_per_node 8 task.py                        # 8 GPUs of one machine
    torchrun --nnodes 4 --nproc_per_node 8 --node_rank $NODE_RANK \\
             --rdzv_backend c10d --rdzv_endpoint host0:29500 task.py   # 4 machines

    # task.py
    import os, torch, torch.distributed as dist, tlprisms as tp
    dist.init_process_group()                 # "nccl" on GPUs, "gloo" on CPUs
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)              # GPUs only
    model = load_model(device=f"cuda:{local}")
    res = tp.explain_task(model, rows(), keep="stats", parquet="out/terms.parquet")
    if dist.get_rank() == 0:
        print(res.summary())

When the process group is initialised (or with ``distributed=True``), item ``i`` of the
task is computed by rank ``i % world_size``; every rank must be given the same items in the
same order (each one reads them all and skips the others' items). Each rank keeps running
statistics of its own prompts; they are gathered (``all_gather_object``: a few tensors with
one row per component) and merged exactly (:class:`~tlprisms._tasks.stats.RunningStats`) in rank
order, so **every rank returns the same result**, bit for bit. It equals one process run on
the same shards, merged, to float64 rounding; against one process run on the whole task it
differs only as much as the terms do when batched with other prompts (other padding:
float32 rounding). With ``keep="values"`` the per-prompt values are gathered too (on the
CPU) and put back in task order. Parquet output: one file per rank (``terms-rank0.parquet``,
... or a ``{rank}`` in the path); read them together with ``pandas.read_parquet(dir)`` or
duckdb's ``read_parquet('out/terms-rank*.parquet')``.

If one rank raises (a bad item), the others wait in the collective until the launcher
(``torchrun``) ends the job; the error is in that rank's output.

>>> world(False)
(0, 1)
"""

from typing import Any

import torch

from tlprisms._core.errors import ArgumentError

__all__ = ["world", "all_gather"]


def world(distributed: Any, caller: str = "explain_task") -> tuple:
    """``(rank, world_size)`` of this process: ``(0, 1)`` unless ``torch.distributed`` is
    initialised (``distributed=None``) or required (``True``); ``False`` ignores it."""
    import torch.distributed as dist

    if distributed is not None and not isinstance(distributed, bool):
        raise ArgumentError(
            f"{caller}: distributed={distributed!r}; pass None (use torch.distributed when "
            "its process group is initialised), True or False."
        )
    ready = dist.is_available() and dist.is_initialized()
    if distributed is True and not ready:
        raise ArgumentError(
            f"{caller}: distributed=True but torch.distributed is not initialised; launch "
            "with torchrun and call torch.distributed.init_process_group() first."
        )
    if distributed is False or not ready:
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def all_gather(obj: Any, world_size: int) -> list:
    """Every rank's ``obj`` (picklable, small), in rank order, on every rank."""
    import torch.distributed as dist

    if world_size == 1:
        return [obj]
    out: list = [None] * world_size
    with torch.no_grad():
        dist.all_gather_object(out, obj)
    return out
