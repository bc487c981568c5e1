"""Statistics over several processes (Lightning's DDP on GPUs or nodes): sums, gathered rows and a consistency check.

Under DDP every process (rank) sees its own share of the batches, so anything accumulated over batches (router
statistics, a Fisher, a histogram, per-case scores) is one rank's alone until it is reduced. These helpers reduce
with :mod:`torch.distributed` when a process group is running and are the identity in a single process, so the
same code is correct on one CPU and on many GPUs. Every rank must call a helper the same number of times (they are
collectives).

Counts of batches that configure a statistic (``statistics.router_batches``, ``fisher_batches``, ``Distill``'s
``pseudo_threshold_batches``) are global: each rank takes :func:`per_rank` of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["check_identical", "gather_objects", "gather_rows", "global_sum", "global_sums", "numeric_leaves",
           "per_rank", "rank", "shared_map", "world_size"]


def _running() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Processes in the running group (1 without one)."""
    return dist.get_world_size() if _running() else 1


def rank() -> int:
    """This process's rank (0 without a group)."""
    return dist.get_rank() if _running() else 0


def per_rank(n: int) -> int:
    """Batches each rank takes so that all ranks together take ``n`` (rounded up to a multiple of the world size)."""
    return math.ceil(n / world_size()) if n > 0 else 0


def _device() -> torch.device:
    """Where collectives run: the current GPU under NCCL, the CPU otherwise (gloo)."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def global_sum(t: Tensor) -> Tensor:
    """The sum of ``t`` over all ranks (a new tensor on ``t``'s device and dtype; ``t`` itself in one process)."""
    if world_size() == 1:
        return t
    out = t.detach().to(_device(), copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def global_sums(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """:func:`global_sum` of every tensor of ``tensors`` (same shapes on every rank), in one collective per dtype."""
    if world_size() == 1 or not tensors:
        return dict(tensors)
    out: dict[str, Tensor] = {}
    for dtype in sorted({t.dtype for t in tensors.values()}, key=str):
        names = [n for n, t in tensors.items() if t.dtype == dtype]
        flat = global_sum(torch.cat([tensors[n].detach().reshape(-1).cpu() for n in names]))
        start = 0
        for n in names:
            t = tensors[n]
            out[n] = flat[start:start + t.numel()].reshape(t.shape).to(t.device)
            start += t.numel()
    return {n: out[n] for n in tensors}


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (picklable plain data; ``[obj]`` in one process)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def shared_map(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
    """``[fn(item) for item in items]`` on every rank, each rank computing every ``world_size``-th item (results
    must be picklable: CPU tensors, plain data); the list is in ``items``' order everywhere."""
    if world_size() == 1:
        return [fn(item) for item in items]
    mine = {i: fn(items[i]) for i in range(rank(), len(items), world_size())}
    merged = {i: r for part in gather_objects(mine) for i, r in part.items()}
    return [merged[i] for i in range(len(items))]


def gather_rows(t: Tensor) -> Tensor:
    """Every rank's rows ``[N_r, *D]`` concatenated in rank order ``[sum N_r, *D]`` (``N_r`` may differ; the
    trailing shape and dtype may not)."""
    if world_size() == 1:
        return t
    sizes = [int(n) for n in gather_objects(int(t.shape[0]))]
    padded = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=_device())
    padded[: t.shape[0]] = t.detach().to(_device())
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)]).to(t.device)


def numeric_leaves(value: Any, prefix: str = "") -> dict[str, Tensor]:
    """Every tensor and number nested in ``value`` (dicts, lists, tuples), by its dotted path."""
    if isinstance(value, Tensor):
        return {prefix: value}
    if isinstance(value, bool) or not isinstance(value, (int, float, dict, list, tuple)):
        return {}
    if isinstance(value, (int, float)):
        return {prefix: torch.tensor(float(value), dtype=torch.float64)}
    items = value.items() if isinstance(value, dict) else enumerate(value)
    out: dict[str, Tensor] = {}
    for k, v in items:
        out.update(numeric_leaves(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def check_identical(named: dict[str, Any], what: str) -> None:
    """Raise when a statistic of ``named`` (tensors and numbers, nested in dicts and lists) differs between ranks:
    one that was not reduced across processes.

    Compares each tensor's element count, sum and sum of squares (float64) across ranks, to a relative 1e-6.

    Raises:
        RuntimeError: naming the statistics that differ and their sums per rank.
    """
    if world_size() == 1:
        return
    leaves = numeric_leaves(named)
    mine = {n: (t.numel(), float(t.double().sum()), float(t.double().pow(2).sum())) for n, t in leaves.items()}
    everyone = gather_objects(mine)
    names = sorted({n for r in everyone for n in r})
    differ = [n for n in names if any(n not in r or not _same(r[n], everyone[0].get(n)) for r in everyone)]
    if differ:
        shown = "; ".join(f"{n}: sums per rank {[r[n][1] if n in r else None for r in everyone]}" for n in differ[:5])
        raise RuntimeError(f"{what}: {len(differ)} statistic(s) differ between the {world_size()} processes ("
                           f"{shown}); each must be reduced across ranks before it is used or saved "
                           "(cfseg.distributed)")


def _same(a: tuple[int, float, float], b: tuple[int, float, float] | None) -> bool:
    """Same element count, and sums equal to a relative 1e-6 (NaN equals NaN)."""
    if b is None or a[0] != b[0]:
        return False
    return all((math.isnan(x) and math.isnan(y)) or math.isclose(x, y, rel_tol=1e-6, abs_tol=1e-12)
               for x, y in zip(a[1:], b[1:], strict=True))
