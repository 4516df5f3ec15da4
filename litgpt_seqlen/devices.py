"""How the run spreads over devices and what precision plugin it needs: upstream's choices, and one of this run's."""

from __future__ import annotations

import contextlib
import logging
import sys

import torch
from lightning.fabric.plugins import BitsandbytesPrecision
from lightning.fabric.strategies import ModelParallelStrategy

from litgpt_seqlen.ranks import launched_as_rank_zero


def precision_plugins(quantize: str | None, precision: str) -> tuple[list | None, str | None]:
    """(plugins, precision) for ``L.Fabric``: bitsandbytes quantization takes the precision into its plugin (the
    settings check saw a -true precision and one device). float16 on CPU is warned about."""
    if precision == "16-true" and not torch.cuda.is_available() and launched_as_rank_zero():
        print(
            "warning: --precision 16-true on CPU: float16 overflows within a few steps there (the run then stops at"
            " the first non-finite loss). bf16-true or 32-true train on CPU.",
            file=sys.stderr,
        )
    if quantize is None or not quantize.startswith("bnb."):
        return None, precision
    dtype = {"16-true": torch.float16, "bf16-true": torch.bfloat16, "32-true": torch.float32}[precision]
    return [BitsandbytesPrecision(quantize[4:], dtype)], None


def strategy_for(devices: int, num_nodes: int):
    """FSDP2 on several devices (``shard_blocks``), saving each training state as one file (not a sharded folder), so
    that it can hold only the trained part of the model."""
    if devices * num_nodes == 1:
        return "auto"
    return ModelParallelStrategy(
        parallelize_fn=shard_blocks,
        data_parallel_size=devices * num_nodes,
        tensor_parallel_size=1,
        save_distributed_checkpoint=False,
    )


def shard_blocks(model, device_mesh):
    """Every transformer block in an activation-checkpointing wrapper and sharded on its own (FSDP2), the rest of the
    model with the root: litgpt's own layout for its GPT, for any method (frozen and trained parameters alike)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import fully_shard

    mesh = device_mesh["data_parallel"]
    blocks = [checkpoint_wrapper(block, preserve_rng_state=False) for block in model.transformer.h]
    model.transformer.h = torch.nn.ModuleList(blocks)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


@contextlib.contextmanager
def quiet_for(dry_run: bool):
    """Lightning's info lines while Fabric is made ("Using bfloat16 Automatic Mixed Precision"): what a run trains
    with, noise in a dry run, which trains nothing."""
    from lightning_utilities.core import rank_zero

    logger = rank_zero.log  # the logger Lightning's rank_zero_info writes to (lightning.pytorch sets which one)
    level = logger.level
    if dry_run:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
