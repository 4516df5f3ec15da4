"""The fine-tuning methods, by name: one module each holds what differs (``base.Method``)."""

from __future__ import annotations

from litgpt_seqlen.errors import UserInputError
from litgpt_seqlen.methods.adapter import ADAPTER, ADAPTER_V2
from litgpt_seqlen.methods.base import Method
from litgpt_seqlen.methods.full import FULL
from litgpt_seqlen.methods.lora import LORA

METHODS: dict[str, Method] = {method.name: method for method in (LORA, ADAPTER, ADAPTER_V2, FULL)}
DEFAULT = LORA  # without a command word, as `python finetune_lora.py ...`
COMMANDS: dict[str, Method] = {method.command: method for method in METHODS.values()} | {"finetune": LORA}


def method_named(name: str | Method) -> Method:
    if isinstance(name, Method):
        return name
    try:
        return METHODS[name]
    except KeyError:
        raise UserInputError(f"no fine-tuning method {name!r}: use one of {', '.join(METHODS)}.") from None
