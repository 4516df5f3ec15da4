"""The base model: its checkpoint directory (downloaded as upstream does when it names a Hub model), checked for the
files this run reads, and what bitsandbytes' optimizers need of it."""

from __future__ import annotations

from pathlib import Path

import torch
from litgpt import utils as litgpt_utils

from litgpt_seqlen.errors import UserInputError


def find_checkpoint_dir(checkpoint_dir: Path, access_token: str | None, need_weights: bool) -> Path:
    """The checkpoint directory, downloaded when it names a Hub model; it must hold what this run reads."""
    if not checkpoint_dir.is_dir():
        try:
            checkpoint_dir = litgpt_utils.auto_download_checkpoint(
                model_name=checkpoint_dir, access_token=access_token, ignore_tokenizer_files=True
            )
        except (ValueError, OSError) as problem:  # an unknown model name, or no network (requests' errors are OSErrors)
            raise UserInputError(
                f"checkpoint_dir {str(checkpoint_dir)!r} is not a directory and could not be downloaded ({problem})."
            ) from None
    has_tokenizer = (checkpoint_dir / "tokenizer.json").is_file() or (checkpoint_dir / "tokenizer.model").is_file()
    missing = [
        name
        for name, present in (
            ("model_config.yaml", (checkpoint_dir / "model_config.yaml").is_file()),
            ("tokenizer.json or tokenizer.model", has_tokenizer),
            ("lit_model.pth", (checkpoint_dir / "lit_model.pth").is_file() or not need_weights),
        )
        if not present
    ]
    if missing:
        dry_run_hint = " (--seq.dry_run true needs no lit_model.pth)" if missing == ["lit_model.pth"] else ""
        raise UserInputError(f"checkpoint_dir {str(checkpoint_dir)!r} is missing {', '.join(missing)}{dry_run_hint}.")
    return checkpoint_dir


def swap_in_stable_embedding(model) -> None:
    """bitsandbytes' 8-bit optimizers want a StableEmbedding in place of the token embedding."""
    from bitsandbytes.nn import StableEmbedding

    old = model.transformer.wte
    new = StableEmbedding(old.num_embeddings, old.embedding_dim)
    with torch.no_grad():
        new.weight.copy_(old.weight)
    model.transformer.wte = new.to(device=old.weight.device, dtype=old.weight.dtype)
