"""How the run spreads over devices and what precision plugin it needs: upstream's choices, and one of this run's."""

from __future__ import annotations

import torch
from lightning.fabric.plugins import BitsandbytesPrecision
from lightning.fabric.strategies import ModelParallelStrategy
from litgpt.finetune.lora import parallelize_fn


def precision_plugins(quantize: str | None, precision: str) -> tuple[list | None, str | None]:
    """(plugins, precision) for ``L.Fabric``: bitsandbytes quantization takes the precision into its plugin (the
    settings check saw a -true precision and one device)."""
    if quantize is None or not quantize.startswith("bnb."):
        return None, precision
    dtype = {"16-true": torch.float16, "bf16-true": torch.bfloat16, "32-true": torch.float32}[precision]
    return [BitsandbytesPrecision(quantize[4:], dtype)], None


def strategy_for(devices: int, num_nodes: int):
    """Upstream's FSDP-style strategy on several devices, saving each training state as one file (not a sharded
    folder), so that it can hold only the LoRA part of the model."""
    if devices * num_nodes == 1:
        return "auto"
    return ModelParallelStrategy(
        parallelize_fn=parallelize_fn,
        data_parallel_size=devices * num_nodes,
        tensor_parallel_size=1,
        save_distributed_checkpoint=False,
    )
