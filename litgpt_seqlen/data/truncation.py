"""Truncation that keeps what the model learns from: the response, its EOS, and a finite loss.

litgpt's ``SFTDataset`` encodes a sample as ``prompt ids + response ids`` (the response ends with EOS) and, with a
``max_seq_length``, keeps the first ``max_seq_length`` of them: a long prompt pushes the whole response out. Here the
untruncated item is cut by a plan made from the four counts the scan records per sample (``data_utils.SampleParts``):
``prompt`` and ``response`` (the two encodings ``SFTDataset.__getitem__`` makes), ``head`` and ``marker`` (the
leading and trailing prompt tokens that belong to the template: system text, ``### Instruction:`` ...; the response
marker ``### Response:`` ...). The tokens between them are the *user span* (instruction and input, with whatever
template text lies between them, e.g. Alpaca's ``### Input:`` header).

Policy ``prompt`` (the default), for a sample longer than the limit L:

1. if ``head + marker + response <= L``: the response is kept whole (with EOS); the user span keeps its first
   ``ceil(b / 2)`` and last ``floor(b / 2)`` tokens, ``b = L - head - marker - response``; its middle is cut;
2. else if ``head + marker <= L``: the user span is cut entirely, and the response keeps its first
   ``L - head - marker`` tokens (its end and EOS are lost);
3. else (the template alone is longer than L): the first L prompt tokens, as upstream.

Policy ``end``: upstream's cut, the first L tokens of prompt + response.

Labels are the untruncated item's labels at the kept positions, which is how litgpt masks a prompt: the kept prompt
positions are ``ignore_index`` under ``mask_prompt``, and labels equal the ids otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from data_utils import TRUNCATE_FROM, SampleParts


@dataclass(frozen=True)
class Plan:
    """What one sample keeps: ``prompt[:prompt_head] + prompt[-prompt_tail:] + response[:response_kept]``."""

    prompt: int  # untruncated lengths
    response: int
    prompt_head: int  # tokens kept from the start of the prompt
    prompt_tail: int  # tokens kept from the end of the prompt
    response_kept: int  # tokens kept from the start of the response
    max_seq_length: int
    policy: str = "prompt"

    @property
    def length(self) -> int:
        return self.prompt_head + self.prompt_tail + self.response_kept

    @property
    def prompt_kept(self) -> int:
        return self.prompt_head + self.prompt_tail

    @property
    def prompt_cut(self) -> int:
        return self.prompt - self.prompt_kept

    @property
    def response_cut(self) -> int:
        return self.response - self.response_kept

    @property
    def truncated(self) -> bool:
        return self.length < self.prompt + self.response

    @property
    def eos_lost(self) -> bool:
        return self.response_cut > 0  # the response's last token is its EOS

    def kept_positions(self) -> list[int]:
        """Positions of the untruncated ``input_ids`` that are kept, in order."""
        prompt_tail_start = self.prompt - self.prompt_tail
        response = range(self.prompt, self.prompt + self.response_kept)
        return [*range(self.prompt_head), *range(prompt_tail_start, self.prompt), *response]


def plan(parts: SampleParts, max_seq_length: int, policy: str = "prompt") -> Plan:
    """How ``parts`` is cut to ``max_seq_length`` under ``policy`` (``prompt`` or ``end``; see the module doc)."""
    prompt, response, head, marker = parts
    limit = max_seq_length
    if limit < 1 or policy not in TRUNCATE_FROM:
        raise ValueError(f"bad truncation settings: {max_seq_length=}, {policy=}")
    if prompt + response <= limit:
        kept = (prompt, 0, response)
    elif policy == "end" or head + marker > limit:
        kept_prompt = min(prompt, limit)
        kept = (kept_prompt, 0, min(response, limit - kept_prompt))
    elif head + marker + response <= limit:
        budget = limit - head - marker - response  # user-span tokens that fit; fewer than the span holds
        kept = (head + math.ceil(budget / 2), marker + budget // 2, response)
    else:
        kept = (head, marker, limit - head - marker)
    return Plan(prompt, response, *kept, max_seq_length=limit, policy=policy)


def plan_split(parts: Sequence[SampleParts], max_seq_length: int, policy: str = "prompt") -> list[Plan]:
    return [plan(p, max_seq_length, policy) for p in parts]


def truncate_item(item: Mapping, plan: Plan) -> dict:
    """The item of an untruncated ``SFTDataset`` cut as ``plan`` says.

    ``input_ids`` and ``labels`` keep the planned positions, so the labels stay masked exactly as litgpt masked them
    (kept prompt positions are ``ignore_index`` under ``mask_prompt``; otherwise labels equal the ids).
    ``token_counts``: ``raw_plus_prompt_template`` is the kept length; ``raw`` (instruction + response tokens, for
    throughput) is, under policy ``end``, what ``SFTDataset(max_seq_length=N)`` reports, and otherwise the instruction
    tokens less the prompt tokens cut (never below 0) plus the response tokens kept.
    """
    ids = item["input_ids"]
    if len(ids) != plan.prompt + plan.response:
        raise ValueError(
            f"the item has {len(ids)} tokens, its plan {plan.prompt} + {plan.response}: scan and data differ"
        )
    result = dict(item)
    if not plan.truncated:
        return result
    import torch

    positions = torch.tensor(plan.kept_positions(), dtype=torch.long)
    result["input_ids"] = ids[positions]
    result["labels"] = item["labels"][positions]
    if "token_counts" in item:
        instruction = item["token_counts"]["raw"] - plan.response
        if plan.policy == "end":  # as upstream counts it: each encoding capped at max_seq_length
            raw = min(instruction, plan.max_seq_length) + min(plan.response, plan.max_seq_length)
        else:
            raw = max(0, instruction - plan.prompt_cut) + plan.response_kept
        result["token_counts"] = {"raw": raw, "raw_plus_prompt_template": plan.length}
    return result


class TruncatedSFT:
    """A map-style dataset: ``dataset[i]`` (an untruncated ``SFTDataset``) cut by ``plans[i]``."""

    def __init__(self, dataset, plans: Sequence[Plan]) -> None:
        if len(plans) != len(dataset):
            raise ValueError(f"{len(plans)} plans for {len(dataset)} samples")
        self.dataset, self.plans = dataset, plans

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return truncate_item(self.dataset[index], self.plans[index])


def masks_prompt(dataset) -> bool:
    """Whether the prompt's labels are ignored: the dataset's ``mask_prompt``; other datasets' prompts are, by
    ``sample_parts``' definition, their ignored labels."""
    return bool(getattr(dataset, "mask_prompt", True))


def supervised_targets(plan: Plan, mask_prompt: bool) -> int:
    """How many positions of the cut sample the loss learns from.

    litgpt's loss compares ``logits[..., :-1]`` with ``labels[..., 1:]``: position 0 is never a target. Under
    ``mask_prompt`` the targets are the kept response positions, less the first one when no prompt token is kept
    (it is then position 0); otherwise every position but the first.
    """
    if not mask_prompt:
        return max(0, plan.length - 1)
    if plan.prompt_kept == 0:
        return max(0, plan.response_kept - 1)
    return plan.response_kept


def unsupervised(plans: Sequence[Plan], mask_prompt: bool) -> list[int]:
    """Indices of the samples with no target left: never trained or validated on (their loss would be NaN)."""
    return [i for i, p in enumerate(plans) if supervised_targets(p, mask_prompt) == 0]


def drop_unsupervised(kept: Sequence[int], plans: Sequence[Plan], mask_prompt: bool) -> tuple[list[int], list[int]]:
    """``(kept, unsupervised)``: the indices of ``kept`` whose cut sample has a target, and those that have none."""
    without = {kept[j] for j in unsupervised([plans[i] for i in kept], mask_prompt)}
    return [i for i in kept if i not in without], sorted(without)


def truncation_stats(seen: Sequence[Plan], unsupervised_dropped: int) -> dict:
    """Per split report figures: the cut figures count the samples the model sees (``seen``);
    ``unsupervised_dropped`` the samples left out for having no target."""
    return {
        "truncated": sum(p.truncated for p in seen),
        "prompt_tokens_cut": sum(p.prompt_cut for p in seen),
        "response_tokens_cut": sum(p.response_cut for p in seen),
        "responses_cut": sum(p.response_cut > 0 for p in seen),
        "eos_lost": sum(p.eos_lost for p in seen),
        "unsupervised_dropped": unsupervised_dropped,
    }


def response_cut_share(parts: Sequence[SampleParts], max_seq_length: int, policy: str = "prompt") -> float:
    """The share of all response tokens (EOS included) that ``max_seq_length`` would cut under ``policy``."""
    total = sum(p.response for p in parts)
    cut = sum(plan(p, max_seq_length, policy).response_cut for p in parts)
    return cut / total if total else 0.0


def add_response_cut(what_if_rows: Sequence[dict], parts: Sequence[SampleParts], policy: str = "prompt") -> list[dict]:
    """``data_utils.what_if`` rows with ``response_tokens_cut_share`` added (``parts`` of all splits together)."""
    return [
        {**row, "response_tokens_cut_share": response_cut_share(parts, row["max_seq_length"], policy)}
        for row in what_if_rows
    ]
