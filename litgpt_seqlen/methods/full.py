"""Full fine-tuning: litgpt's ``finetune_full``. Every parameter trains; final/ and every step-*/ hold the whole
model as ``lit_model.pth`` (upstream's step files also carry the optimizer: here it is in resume/, with the rest of
the training state)."""

from __future__ import annotations

from pathlib import Path

import litgpt.finetune.full as upstream
from litgpt.model import GPT, Block, Config

from litgpt_seqlen.methods.base import Method


def save_weights(fabric, model, path: Path) -> None:
    fabric.save(path, {"model": model})


FULL = Method(
    name="full",
    upstream=upstream,
    config_class=Config,
    gpt_class=GPT,
    block_class=Block,
    weights_file="lit_model.pth",
    save_weights=save_weights,
    strict_base_load=True,
)
