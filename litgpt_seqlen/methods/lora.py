"""LoRA: litgpt's ``finetune_lora``. Low-rank matrices beside the frozen weights; final/ also gets them merged."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import litgpt.finetune.lora as upstream
from litgpt.lora import GPT, Block, Config, lora_filter
from litgpt.scripts.merge_lora import merge_lora

from litgpt_seqlen.methods.base import Method


def merge_into_final(final_dir: Path, checkpoint_dir: Path, precision: str | None) -> None:
    """final/lit_model.pth: the LoRA merged into the base weights, as upstream's script ends. merge_lora's own lines
    (its arguments, "Saved merged weights to ...") are not shown: they name the directory final/ is written in before
    it is renamed; the run says where final/ is once it is."""
    (final_dir / "lit_model.pth").unlink(missing_ok=True)  # an earlier run's merge: merge_lora would keep it
    with contextlib.redirect_stdout(io.StringIO()):
        merge_lora(checkpoint_dir=final_dir, pretrained_checkpoint_dir=checkpoint_dir, precision=precision)


LORA = Method(
    name="lora",
    upstream=upstream,
    config_class=Config,
    gpt_class=GPT,
    block_class=Block,
    weights_file="lit_model.pth.lora",
    trainable=lora_filter,
    config_flags=tuple(
        f"lora_{part}" for part in ("r", "alpha", "dropout", "query", "key", "value", "projection", "mlp", "head")
    ),
    save_weights=upstream.save_lora_checkpoint,
    finish=merge_into_final,
)
