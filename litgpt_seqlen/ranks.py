"""What every rank of a run must agree on: which process is rank 0 before Fabric exists, and a problem met on one rank."""

from __future__ import annotations

import os

from litgpt_seqlen.errors import UserInputError


def launched_as_rank_zero() -> bool:
    """Whether this process is global rank 0 as its launcher set the environment (True when started by hand).
    Fabric's subprocess launcher starts rank k > 0 with LOCAL_RANK=k; torchrun and SLURM set RANK / SLURM_PROCID."""
    for name in ("RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK"):
        if os.environ.get(name, "0").strip() not in ("", "0"):
            return False
    return True


def agree_on_error(fabric, problem: UserInputError | None) -> None:
    """Called by every rank after a step that may fail on some ranks only (with ``problem`` the error this rank
    met, or None): if any rank met one, every rank raises the message of the lowest such rank, so rank 0 can say it."""
    if fabric.world_size == 1:
        if problem is not None:
            raise problem
        return
    import torch

    failed = fabric.all_gather(torch.tensor(problem is not None, device=fabric.device)).flatten().tolist()
    if not any(failed):
        return
    source = failed.index(True)
    message = fabric.broadcast(str(problem) if fabric.global_rank == source else None, src=source)
    raise UserInputError(message)
