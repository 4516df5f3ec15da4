"""Full (unsharded) tensors into a model sharded over the ranks, each rank taking its shard, with torch's own
state-dict API (names of activation-checkpointing wrappers are resolved by it)."""

from __future__ import annotations

from pathlib import Path

import torch


def load_full_weights(model, weights: dict, strict: bool = False) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    module = getattr(model, "module", model)  # Fabric's wrapper holds the sharded module
    set_model_state_dict(module, weights, options=StateDictOptions(full_state_dict=True, strict=strict))


def load_full_weights_file(fabric, model, path: Path, strict: bool = False) -> None:
    """A checkpoint file (``{"model": ...}`` or the tensors themselves, as litgpt writes them) into a sharded model:
    the base weights, whose names are the plain GPT's."""
    weights = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    weights = weights.get("model", weights)
    module = getattr(model, "module", model)
    names = {name.replace("_checkpoint_wrapped_module.", "") for name in module.state_dict()}
    load_full_weights(model, {in_model(name, names): tensor for name, tensor in weights.items()}, strict)


def in_model(name: str, names: set[str]) -> str:
    """A plain GPT's parameter name as the model names it: litgpt's LoRA and adapter v2 layers hold their Linear as
    ``.linear`` (``attn.qkv.weight`` is ``attn.qkv.linear.weight`` there)."""
    head, _, leaf = name.rpartition(".")
    wrapped = f"{head}.linear.{leaf}"
    return wrapped if name not in names and wrapped in names else name
