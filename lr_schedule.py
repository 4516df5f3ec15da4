"""The learning-rate schedule, with ``--train.lr_warmup_steps 0`` meaning no warmup.

litgpt's ``get_lr_scheduler`` builds ``LambdaLR(lambda step: step / warmup_steps)``, which divides by zero at once
when warmup_steps is 0 (and fails on None). A user who writes 0 means "no warmup", as in Hugging Face's Trainer
and torchtune, so 0 and None give the cosine decay alone, over all the run's steps. Any other value is litgpt's
schedule, unchanged. ``input_checks.check_schedule`` refuses a warmup not below the run's steps.
"""

import torch
from litgpt.finetune.lora import get_lr_scheduler as litgpt_lr_scheduler


def get_lr_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int | None, max_steps: int):
    if not warmup_steps:
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_steps)
    return litgpt_lr_scheduler(optimizer, warmup_steps=warmup_steps, max_steps=max_steps)
