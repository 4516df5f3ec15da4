"""The learning-rate schedule, with ``--train.lr_warmup_steps 0`` meaning no warmup.

litgpt's ``get_lr_scheduler`` builds ``LambdaLR(lambda step: step / warmup_steps)``, which divides by zero at once
when warmup_steps is 0 (and fails on None). A user who writes 0 means "no warmup", as in Hugging Face's Trainer
and torchtune, so 0 and None give the cosine decay alone, over all the run's steps. Any other value is litgpt's
schedule, unchanged. ``check_schedule`` refuses a warmup not below the run's steps.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from litgpt.finetune.full import get_lr_scheduler as litgpt_lr_scheduler

from litgpt_seqlen.errors import UserInputError


def get_lr_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int | None, max_steps: int):
    if not warmup_steps:
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_steps)
    return litgpt_lr_scheduler(optimizer, warmup_steps=warmup_steps, max_steps=max_steps)


def replanned_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int | None, max_steps: int, step: int):
    """The schedule of a run planned for ``max_steps`` from the start, at ``step``: for a resumed run that goes on for
    more steps than it was planned with (its steps so far followed the shorter plan)."""
    for group in optimizer.param_groups:  # from the base rate, as a new schedule starts
        group["lr"] = group["initial_lr"]
    scheduler = get_lr_scheduler(optimizer, warmup_steps, max_steps)
    with warnings.catch_warnings():  # the steps already taken: no optimizer step to pair with them here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(step):
            scheduler.step()
    return scheduler


@dataclass(frozen=True)
class Steps:
    """The run's optimizer steps, counted once from the batch order it trains with (a dry run counts the same)."""

    micro_batches_per_epoch: int  # on each rank: every order gives every rank as many
    accumulation: int  # micro-batches per optimizer step on each rank
    total: int  # the optimizer steps the loop takes: the length of the learning-rate schedule

    @classmethod
    def count(cls, micro_batches_per_epoch: int, accumulation: int, epochs: int | None, max_steps: int | None):
        """The loop steps every ``accumulation`` micro-batches and runs through its epochs back to back, until the
        epochs are used up or ``max_steps`` is reached. The train order of a run holds a whole number of steps per
        epoch (``order.train_batches`` with its step size), so no step takes micro-batches from two epochs."""
        total = micro_batches_per_epoch * epochs // accumulation if epochs else math.inf
        return cls(micro_batches_per_epoch, accumulation, int(min(total, max_steps or math.inf)))


def check_schedule(
    warmup_steps: int | None,
    lr_max_steps: int,
    *,
    micro_batches_per_epoch: int | None = None,
    epochs: int | None = None,
    max_steps: int | None = None,
    accumulation: int | None = None,
) -> list[dict]:
    """The run must take at least one optimizer step, and must not warm up for exactly as many steps as it takes.

    litgpt's ``get_lr_scheduler`` divides by zero when ``warmup_steps`` equals the run's steps (its cosine phase has
    ``T_max = max_steps - warmup_steps = 0``): refused. Above, the run ends still warming up (it never reaches
    --optimizer's learning rate and never decays): litgpt runs it (its own LoRA test does, with the default 100 steps
    of warmup over 6 steps), so it stays allowed, with a warning, returned as ``outcome_warnings`` returns them.
    0 (or None) means no warmup: see ``get_lr_scheduler``."""
    how = _steps_explained(lr_max_steps, micro_batches_per_epoch, epochs, max_steps, accumulation)
    if lr_max_steps < 1:
        per_step = f" (one step takes {accumulation} micro-batches per device)" if accumulation else ""
        raise UserInputError(
            f"the run would take no optimizer step{how}: the train split is smaller than one global batch{per_step}."
            " Lower --train.global_batch_size, or add train samples."
        )
    if not warmup_steps or warmup_steps < lr_max_steps:
        return []
    example = f" (e.g. {lr_max_steps // 10})" if lr_max_steps >= 10 else ""  # a suggestion that is itself below
    fix = (
        f"Set --train.lr_warmup_steps below {lr_max_steps}{example}, or 0 for no warmup;"
        " or train longer (--train.epochs, --train.max_steps)."
    )
    if warmup_steps == lr_max_steps:
        raise UserInputError(
            f"--train.lr_warmup_steps {warmup_steps} equals the run's {lr_max_steps} optimizer steps{how}: litgpt's"
            f" scheduler divides by zero at the last step (its cosine phase would last 0 steps). {fix}"
        )
    return [
        {
            "kind": "warmup_beyond_run",
            "lr_warmup_steps": warmup_steps,
            "optimizer_steps": lr_max_steps,
            "message": f"--train.lr_warmup_steps {warmup_steps} is above the run's {lr_max_steps} optimizer steps{how}:"
            f" the learning rate never finishes warming up (its last step uses {(lr_max_steps - 1) / warmup_steps:.0%}"
            f" of --optimizer's lr) and never decays. {fix}",
        }
    ]


def _steps_explained(
    total: int, micro_batches: int | None, epochs: int | None, max_steps: int | None, accumulation
) -> str:
    if max_steps and total == max_steps:
        return f" (--train.max_steps {max_steps})"
    if micro_batches is not None and epochs:
        per_step = f", {accumulation} per step" if accumulation else ""
        return f" ({epochs} epochs × {micro_batches} micro-batches per device{per_step})"
    return ""
