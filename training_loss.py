"""The loss of one training micro-batch: the one function that fit, the rehearsal and the benchmarks share."""

import torch
from litgpt.utils import chunked_cross_entropy


def train_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Mean cross-entropy over the supervised tokens of ``batch`` (labels equal to -100 are ignored)."""
    logits = model(batch["input_ids"], lm_head_chunk_size=128)
    logits[-1] = logits[-1][..., :-1, :]  # output n predicts token n + 1
    return chunked_cross_entropy(logits, batch["labels"][..., 1:])
