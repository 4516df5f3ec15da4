"""Token-weighted loss (--seq.loss_weighting token): every supervised token of an optimizer step weighs the same.

Upstream averages the loss within each micro-batch and then over the micro-batches of a step, so a token in a
micro-batch with few supervised tokens weighs more than one in a full micro-batch. Here a step's loss is

    (sum of the token losses of all its micro-batches on all ranks) / (number of supervised tokens of the step)

Each micro-batch contributes its loss *sum*; the step's token count is known before the first backward pass
(``StepLookahead`` draws the step's micro-batches first and ``step_supervised_tokens`` counts them, summed over the
ranks). ``train_loss`` divides each micro-batch's loss sum by the step's mean tokens per micro-batch
(``step_tokens / (accumulation * world_size)``); fit divides by ``accumulation`` as upstream does and data
parallelism averages over the ranks, which leaves the gradient of the step's mean over all its tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from litgpt.utils import chunked_cross_entropy

from litgpt_seqlen.errors import UserInputError
from litgpt_seqlen.model.packed_forward import batch_logits

IGNORE_INDEX = -100


def shifted(logits: torch.Tensor | list[torch.Tensor], labels: torch.Tensor):
    """Output n predicts token n + 1: the logits without the last position and the labels without the first, as
    ``fit`` pairs them (``logits`` may be the list of chunks ``lm_head_chunk_size`` gives)."""
    if isinstance(logits, list):
        return [*logits[:-1], logits[-1][..., :-1, :]], labels[..., 1:]
    return logits[..., :-1, :], labels[..., 1:]


def micro_batch_loss_sum(
    logits: torch.Tensor | list[torch.Tensor], labels: torch.Tensor, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sum of the cross-entropy losses of the supervised tokens of one micro-batch, and their count.

    ``logits`` are the model's output for the whole micro-batch (a tensor or the list of chunks along T that
    ``lm_head_chunk_size`` gives), ``labels`` the batch's labels; the shift is done here. Packed or not alike.
    """
    logits, targets = shifted(logits, labels)
    chunks = logits if isinstance(logits, list) else [logits]
    target_chunks = targets.split([chunk.size(1) for chunk in chunks], dim=1)
    total = sum(
        torch.nn.functional.cross_entropy(
            chunk.reshape(-1, chunk.size(-1)), target.reshape(-1), ignore_index=ignore_index, reduction="sum"
        )
        for chunk, target in zip(chunks, target_chunks)
    )
    return total, (targets != ignore_index).sum()


def supervised_tokens(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The number of tokens of a micro-batch the loss counts (labels after the shift that are not ignored)."""
    return (labels[..., 1:] != ignore_index).sum()


def step_supervised_tokens(batches: Sequence[dict], fabric=None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The supervised tokens of one optimizer step: over ``batches`` (this rank's micro-batches of the step) and, with
    ``fabric``, summed over all ranks. At least 1, so a step without any target gives a zero loss, not a NaN."""
    count = sum(supervised_tokens(batch["labels"], ignore_index) for batch in batches)
    count = torch.as_tensor(count)
    if fabric is not None:
        count = fabric.all_reduce(count.to(fabric.device), reduce_op="sum")
    return count.clamp(min=1)


class StepLookahead:
    """Wraps the batch iterator of ``fit`` (``order.EpochBatches``, or any iterator with an ``epoch``) so that the
    supervised tokens of each optimizer step are known before its first backward pass.

    At the first micro-batch of a step it draws all ``accumulation`` micro-batches of the step and counts their
    supervised tokens over all ranks (``step_supervised_tokens``, a collective: every rank draws at the same
    iterations). ``tokens_per_micro_batch`` is that count divided by the step's micro-batches on all ranks, what
    ``train_loss`` divides each micro-batch's loss sum by. ``epoch`` is the wrapped iterator's epoch as it
    was when the micro-batch just returned was drawn, so fit's ``batches.epoch >= train.epochs`` stops where it would
    without the look-ahead. Any other attribute is the wrapped iterator's (between two steps nothing is pending).
    """

    def __init__(self, batches, accumulation: int, fabric=None, ignore_index: int = IGNORE_INDEX) -> None:
        self.batches, self.accumulation, self.fabric, self.ignore_index = batches, accumulation, fabric, ignore_index
        self.pending: list[tuple[dict, int]] = []
        self.tokens_per_micro_batch = torch.tensor(1.0)
        self.epoch = batches.epoch

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if not self.pending:
            for _ in range(self.accumulation):
                batch = next(self.batches)
                self.pending.append((batch, self.batches.epoch))
            tokens = step_supervised_tokens([batch for batch, _ in self.pending], self.fabric, self.ignore_index)
            micro_batches = self.accumulation * (self.fabric.world_size if self.fabric is not None else 1)
            self.tokens_per_micro_batch = tokens.float() / micro_batches
        batch, self.epoch = self.pending.pop(0)
        return batch

    def __getattr__(self, name: str):
        if name == "batches":  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.batches, name)


def train_loss(model: torch.nn.Module, batch: dict, tokens_per_micro_batch: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of ``batch``, packed (``packing.packed_collate``) or not; labels equal to -100 are ignored.

    Without ``tokens_per_micro_batch``: upstream's mean cross-entropy over this micro-batch's supervised tokens.
    With it (``StepLookahead.tokens_per_micro_batch``: the step's supervised tokens over all its
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


class RunningLoss:
    """The mean of the last ``window`` micro-batch losses (one optimizer step's), as the progress lines show it. The
    losses stay on the device, so updating never waits for it; only ``compute`` does."""

    def __init__(self, window: int, device: torch.device | str = "cpu") -> None:
        self.window, self.device = window, torch.device(device)
        self.values: list[torch.Tensor] = []

    def update(self, loss: torch.Tensor) -> None:
        self.values = [*self.values, loss.detach()][-self.window :]

    def compute(self) -> torch.Tensor:
        return torch.stack(self.values).mean()

    def state_dict(self) -> dict:
        return {"values": [value.cpu() for value in self.values]}

    def load_state_dict(self, state: dict) -> None:
        self.values = [value.to(self.device) for value in state["values"]]


class NonFiniteLoss(UserInputError):
    """The loss became nan or inf: the run stops there, and no weights after the last good checkpoint are written."""


class FiniteLossWatch:
    """Notes on the device the first optimizer step whose loss is not finite (no wait for the device per step);
    ``check`` looks at it where the run waits for the device anyway (progress lines, checkpoints, the end), and before
    a checkpoint also at the trained weights (an overflowing step can break them while its loss is still finite)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.step = torch.tensor(-1, device=device)
        self.loss = torch.tensor(0.0, device=device)

    def update(self, loss: torch.Tensor, step: int) -> None:
        first = (self.step < 0) & ~torch.isfinite(loss.detach())
        self.step = torch.where(first, step, self.step)
        self.loss = torch.where(first, loss.detach().float(), self.loss)

    def check(self, fabric, model=None, step: int = 0) -> None:
        """Raises ``NonFiniteLoss`` when a loss so far was not finite, or (given ``model``, after optimizer step
        ``step``) a trainable weight is not."""
        broken = self.step
        if model is not None:
            weights_ok = all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad)
            broken = torch.where((broken < 0) & ~torch.tensor(bool(weights_ok), device=broken.device), step, broken)
        first = fabric.all_reduce(broken, reduce_op="max") if fabric.world_size > 1 else broken
        if int(first) < 0:
            return
        what = f"the loss is {self.loss.item()}" if int(self.step) >= 0 else "the trained weights are not finite"
        raise NonFiniteLoss(
            f"{what} at optimizer step {int(first)}: training stops here, and nothing after the last checkpoint is"
            " saved (final/ is not written). Likely causes: --precision 16-true (float16 overflows; use bf16-true or"
            " 32-true), or a learning rate too high for this model (--optimizer). Start a new run (another --out_dir)"
            " with either changed: a resume keeps the run's settings."
        )
