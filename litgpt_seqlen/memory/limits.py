"""The memory a micro-batch search may use: every rank held to what the tightest rank has free, less the margin.

Ranks run the rehearsal in lockstep: a sharded model gathers each block's weights from all ranks. A rank that ran out
of memory alone would leave the others waiting in a collective for good. Held to the same free memory, ranks that run
the same batches on the same model run out at the same allocation, so all of them fail or pass a try together.
"""

from __future__ import annotations

import math
import resource
from contextlib import contextmanager

import torch
import torch.distributed

UNLIMITED = math.inf


def free_memory(device: torch.device) -> float:
    """Bytes this process may still allocate on ``device``: on CUDA what the device has free plus what the caching
    allocator holds unused; on CPU what the address-space limit (``ulimit -v``) leaves, unlimited when none is set
    (then only the system's out-of-memory killer stops a process, which no program can catch)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return UNLIMITED
    return float(max(0, soft - address_space_in_use()))


def address_space_in_use() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def device_total(device: torch.device) -> int | None:
    """The device's memory in bytes, None where it reports none (CPU)."""
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def tightest_free(fabric) -> float:
    """The least free memory of any rank (``free_memory``), the same on every rank."""
    mine = free_memory(fabric.device)
    if fabric.world_size == 1:
        return mine
    value = torch.tensor([min(mine, 2.0**62)], dtype=torch.float64, device=fabric.device)
    least = fabric.all_reduce(value, reduce_op="min").item()
    return UNLIMITED if least >= 2.0**62 else least


@contextmanager
def search_limits(fabric, margin: float):
    """While the search runs: every rank held to the free memory of the tightest rank, so that ranks run out at the
    same allocation (on CUDA through the caching allocator's per-process fraction; the margin is checked on the peak
    there). On CPU under an address-space limit, also ``margin`` of that free memory kept back, as CUDA keeps it from
    the device. Put back on leaving. Returns (yields) the bytes a try may use on CPU, None where unlimited or CUDA."""
    least = tightest_free(fabric)
    device = fabric.device
    if least == UNLIMITED:
        yield None
    elif device.type == "cuda":
        if fabric.world_size == 1 or free_memory(device) <= least:
            yield None
            return
        allowed = torch.cuda.memory_reserved(device) + least
        torch.cuda.set_per_process_memory_fraction(min(1.0, allowed / device_total(device)), device)
        try:
            yield None
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    else:
        previous = resource.getrlimit(resource.RLIMIT_AS)
        allowed = int(least * (1 - margin))
        resource.setrlimit(resource.RLIMIT_AS, (address_space_in_use() + allowed, previous[1]))
        try:
            yield allowed
        finally:
            resource.setrlimit(resource.RLIMIT_AS, previous)
