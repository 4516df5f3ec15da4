"""The loss of one training micro-batch: the one function that fit, the rehearsal and the benchmarks share."""

import torch
from litgpt.utils import chunked_cross_entropy

from packed_forward import batch_logits
from token_loss import micro_batch_loss_sum


def train_loss(model: torch.nn.Module, batch: dict, tokens_per_micro_batch: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of ``batch``, packed (``packing.packed_collate``) or not; labels equal to -100 are ignored.

    Without ``tokens_per_micro_batch``: upstream's mean cross-entropy over this micro-batch's supervised tokens.
    With it (``token_loss.StepLookahead.tokens_per_micro_batch``: the step's supervised tokens over all its
    micro-batches and ranks, divided by their number): the sum of this micro-batch's token losses divided by it.
    fit's ``backward(loss / accumulation)``, with the ranks' gradients averaged, then gives the gradient of the mean
    over all the step's tokens, and the mean of these losses over a step is the step's loss (on one device).
    """
    logits = batch_logits(model, batch, lm_head_chunk_size=128)
    if tokens_per_micro_batch is not None:
        loss_sum, _ = micro_batch_loss_sum(logits, batch["labels"])
        return loss_sum / tokens_per_micro_batch.to(loss_sum.device)
    logits[-1] = logits[-1][..., :-1, :]  # output n predicts token n + 1
    return chunked_cross_entropy(logits, batch["labels"][..., 1:])
