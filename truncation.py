"""Truncation that keeps what the model learns from: the response, its EOS, and a finite loss (issue 11).

litgpt's ``SFTDataset`` encodes a sample as ``prompt ids + response ids`` (the response ends with EOS) and, with a
``max_seq_length``, keeps the first ``max_seq_length`` of them: a long prompt pushes the whole response out. Here the
untruncated item is cut by a plan made from four lengths per sample (``SampleParts``):

- ``prompt``, ``response``: the lengths of the two encodings, exactly as ``SFTDataset.__getitem__`` makes them;
- ``head``: the leading prompt tokens that belong to the template (system text, ``### Instruction:`` ...);
- ``marker``: the trailing prompt tokens that belong to the template (the response marker, ``### Response:`` ...).

The tokens between ``head`` and ``marker`` are the *user span* (instruction and input, with whatever template text
lies between them, e.g. Alpaca's ``### Input:`` header). Token boundaries are found on the encoded prompt itself,
never by encoding pieces (BPE merges across piece boundaries): the head is the longest run of leading tokens the
prompt shares with the same prompt built with placeholder user text, the marker the longest such run of trailing
tokens (see ``template_bounds``). A token where the template and the user text merged belongs to the user span.

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

import functools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from data_utils import UserInputError

TRUNCATE_FROM = ("prompt", "end")
USER_FIELDS = ("instruction", "input")  # the user's text; every other field is template (sys_prompt, ...)
PLACEHOLDERS = ("x", "y")  # two, so a user text that happens to start or end like one of them does not move a bound


class SampleParts(NamedTuple):
    """Token counts of one untruncated sample: ``prompt + response`` is ``len(dataset[i]["input_ids"])``."""

    prompt: int  # the encoded prompt (template + user text, with BOS when the tokenizer adds it)
    response: int  # the encoded response, EOS included
    head: int  # leading prompt tokens that belong to the template
    marker: int  # trailing prompt tokens that belong to the template (the response marker)

    @property
    def length(self) -> int:
        return self.prompt + self.response


# ---------------------------------------------------------------------------------------------------------------
# Scanning: prompt and response lengths, and where the template ends and resumes
# ---------------------------------------------------------------------------------------------------------------


def sample_parts(dataset, index: int, split: str = "?") -> SampleParts:
    """The ``SampleParts`` of ``dataset[index]``, for an untruncated dataset, without building the item.

    For litgpt's ``SFTDataset`` the prompt and the response are encoded as its ``__getitem__`` encodes them. Any
    other dataset is asked for its item: its prompt is the leading run of ``ignore_index`` labels, none of which is
    protected (so both policies cut it as upstream does).
    """
    from litgpt.data import SFTDataset

    try:
        if type(dataset).__getitem__ is SFTDataset.__getitem__ and dataset.max_seq_length <= 0:
            return _sft_parts(dataset, index, split)
        return _item_parts(dataset[index], getattr(dataset, "ignore_index", -100))
    except KeyError as missing:
        raise UserInputError(
            f"{split} sample {index} has no field {missing.args[0]!r}, which the prompt needs. Every sample needs"
            " 'instruction' and 'output' (and whatever else the --data.prompt_style uses). Fix the data file."
        ) from None


def _sft_parts(dataset, index: int, split: str) -> SampleParts:
    example = dataset.data[index]
    if not isinstance(example, Mapping):
        raise UserInputError(
            f"{split} sample {index} is a {type(example).__name__}, not an object with the fields"
            " 'instruction' and 'output'. Fix the data file."
        )
    if dataset.transform is not None:
        example = dataset.transform(example)
    tokenizer, style = dataset.tokenizer, dataset.prompt_style
    prompt_ids = tokenizer.encode(style.apply(prompt=example["instruction"], **example)).tolist()
    response = len(tokenizer.encode(example["output"], bos=False, eos=True))
    placeholder_ids = [
        _encoded(tokenizer, style.apply(prompt=e["instruction"], **e)) for e in _placeholder_examples(example)
    ]
    head, marker = template_bounds(prompt_ids, placeholder_ids)
    return SampleParts(len(prompt_ids), response, head, marker)


def _item_parts(item: Mapping, ignore_index: int) -> SampleParts:
    labels = item["labels"].tolist()
    prompt = next((i for i, label in enumerate(labels) if label != ignore_index), len(labels))
    return SampleParts(prompt, len(labels) - prompt, 0, 0)


def _placeholder_examples(example: Mapping) -> list[dict]:
    """The example with its user text replaced by a placeholder, once per placeholder: the instruction always (every
    template places it, so an empty one still parts head from marker), the input only when given (an empty input
    selects Alpaca's shorter template, which must stay the same)."""
    examples = []
    for placeholder in PLACEHOLDERS:
        copy = dict(example)
        for field in USER_FIELDS:
            if isinstance(copy.get(field), str) and (copy[field] or field == "instruction"):
                copy[field] = placeholder
        examples.append(copy)
    return examples


@functools.lru_cache(maxsize=4096)
def _encoded(tokenizer, prompt: str) -> tuple[int, ...]:
    # A data set has few distinct placeholder prompts (one per template shape), so they are encoded once.
    return tuple(tokenizer.encode(prompt).tolist())


def template_bounds(prompt_ids: Sequence[int], placeholder_ids: Sequence[Sequence[int]]) -> tuple[int, int]:
    """``(head, marker)``: the leading and trailing tokens of ``prompt_ids`` shared with every placeholder prompt.

    The placeholder prompts differ from the prompt only in the user text, so what they all share with it at the start
    and at the end is template. ``head + marker`` never exceeds ``len(prompt_ids)``.
    """
    head = min(_common_prefix(prompt_ids, other) for other in placeholder_ids)
    marker = min(_common_prefix(prompt_ids[::-1], other[::-1]) for other in placeholder_ids)
    return head, min(marker, len(prompt_ids) - head)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


_scan_target: tuple = ()  # the dataset a forked worker reads; set just before the pool forks, so nothing is pickled


def scan_parts(dataset, split: str, start: int = 0, stop: int | None = None, workers: int = 1) -> list[SampleParts]:
    """``sample_parts`` of samples ``start..stop``, in order, using up to ``workers`` forked processes."""
    import multiprocessing
    import os

    stop = len(dataset) if stop is None else stop
    workers = max(1, min(workers, (stop - start) // 256))  # a pool is not worth it for a few hundred samples
    chunk = max(1, min(2048, math.ceil((stop - start) / (workers * 8))))
    bounds = [(lo, min(lo + chunk, stop)) for lo in range(start, stop, chunk)]
    global _scan_target
    _scan_target = (dataset, split)
    try:
        if workers == 1:
            return [parts for piece in map(_scan_range, bounds) for parts in piece]
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # HF tokenizers refuse their thread pool after a fork
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            return [SampleParts(*parts) for piece in pool.imap(_scan_range, bounds) for parts in piece]
    finally:
        _scan_target = ()


def _scan_range(bounds: tuple[int, int]) -> list[SampleParts]:
    dataset, split = _scan_target
    return [sample_parts(dataset, i, split) for i in range(*bounds)]


# ---------------------------------------------------------------------------------------------------------------
# The plan: how many tokens each part keeps
# ---------------------------------------------------------------------------------------------------------------


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


def check_truncate_from(truncate_from: str) -> None:
    if truncate_from not in TRUNCATE_FROM:
        raise UserInputError(f"--seq.truncate_from must be one of {', '.join(TRUNCATE_FROM)}, got {truncate_from!r}.")


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


# ---------------------------------------------------------------------------------------------------------------
# Applying a plan to what litgpt's data module produced
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# The learning signal, and the report
# ---------------------------------------------------------------------------------------------------------------


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


def truncation_stats(plans: Sequence[Plan], mask_prompt: bool) -> dict:
    """Per split report figures over ``plans`` (the samples left after ``--seq.over_length``). The cut figures count
    the samples the model sees; ``unsupervised_dropped`` counts those left out for having no target."""
    dropped = set(unsupervised(plans, mask_prompt))
    seen = [p for i, p in enumerate(plans) if i not in dropped]
    return {
        "truncated": sum(p.truncated for p in seen),
        "prompt_tokens_cut": sum(p.prompt_cut for p in seen),
        "response_tokens_cut": sum(p.response_cut for p in seen),
        "responses_cut": sum(p.response_cut > 0 for p in seen),
        "eos_lost": sum(p.eos_lost for p in seen),
        "unsupervised_dropped": len(dropped),
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


def format_what_if(rows: Sequence[dict], block_size: int) -> str:
    """``data_utils.format_what_if`` with a last column: the share of response tokens cut."""
    lines = ["what if max_seq_length were ...   samples cut    tokens cut  response tokens cut"]
    for row in rows:
        label = "/".join(filter(None, [row["label"], "block_size" if row["max_seq_length"] == block_size else ""]))
        shares = f"{row['samples_cut_share']:>10.1%}  {row['tokens_cut_share']:>11.2%}"
        lines.append(f"  {row['max_seq_length']:>7} {label:<20} {shares}  {row['response_tokens_cut_share']:>19.2%}")
    return "\n".join(lines)


def dropped_entry(split: str, index: int, length: int, sample: object, reason: str) -> dict:
    """One line of ``dropped_samples.jsonl``: ``reason`` is ``over_length`` (``--seq.over_length drop``) or
    ``unsupervised`` (no target left after cutting)."""
    return {"split": split, "index": index, "length": length, "reason": reason, "sample": sample}


def write_dropped(path: Path, entries: Sequence[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(entry, ensure_ascii=False) + "\n" for entry in entries)
