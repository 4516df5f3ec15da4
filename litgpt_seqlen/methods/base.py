"""What a fine-tuning method is to the flow: everything that differs between litgpt's LoRA, adapter, adapter v2 and
full fine-tuning, in one value per method. The flow (``setup -> main -> fit``) is written once and asks the method.

A method names litgpt's own parts (its ``finetune`` module, whose ``setup`` gives the flags, defaults and help; its
``Config``, ``GPT`` and ``Block``) and says what is trained, what a checkpoint holds and how ``final/`` is finished.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch

from litgpt_seqlen.errors import UserInputError


def everything(name: str, value: object) -> bool:
    return True


def nothing_to_finish(final_dir: Path, checkpoint_dir: Path, precision: str | None) -> None:
    return None


def nothing_to_prepare(model: torch.nn.Module) -> None:
    return None


@dataclass(frozen=True)
class Method:
    name: str  # "adapter_v2": its command is finetune_adapter_v2
    upstream: (
        ModuleType  # litgpt.finetune.<name>: its setup's signature is the command line, its validate_args the rules
    )
    config_class: type  # litgpt's Config for the method (LoRA's takes the lora_* flags)
    gpt_class: type  # litgpt's GPT for the method
    block_class: type  # its Block, tried on the meta device before packing
    weights_file: str  # what upstream writes in final/ and every step-*/ ("lit_model.pth.adapter")
    trainable: Callable[[str, object], bool] = everything  # (parameter name, value) -> trained; saved in checkpoints
    config_flags: tuple[str, ...] = ()  # upstream flags that go into Config (and must match to resume)
    save_weights: Callable | None = None  # (fabric, model, path): the trained weights as upstream writes them
    finish: Callable[[Path, Path, str | None], None] = nothing_to_finish  # (final_dir, base checkpoint_dir, precision)
    prepare: Callable[[torch.nn.Module], None] = nothing_to_prepare  # on the freshly built model, before any weight
    strict_base_load: bool = False  # the base weights cover every parameter (full) or only the frozen ones

    @property
    def command(self) -> str:
        return f"finetune_{self.name}"

    def check_trainable(self, config) -> None:
        """Refuses a config that leaves this method nothing to train (adapters starting past the last layer), from the
        config alone: the model is built on the meta device (no memory, no weights)."""
        with torch.device("meta"):
            model = self.gpt_class(config)
        self.mark_trainable(model)
        if any(parameter.requires_grad for parameter in model.parameters()):
            return
        start = getattr(config, "adapter_start_layer", None)
        fix = (
            ""
            if start is None
            else (
                f" (adapters start at layer adapter_start_layer {start}; the model has n_layer {config.n_layer}). Set"
                " adapter_start_layer below n_layer in model_config.yaml, or use another method"
            )
        )
        raise UserInputError(f"{self.command} would train no parameter of this model{fix}.")

    def mark_trainable(self, model: torch.nn.Module) -> None:
        for name, parameter in model.named_parameters():
            parameter.requires_grad = self.trainable(name, parameter)
