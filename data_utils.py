"""Sequence-length logic for LoRA fine-tuning, as plain functions over plain values.

Nothing here imports torch, a model or another module of this project, reads a file or writes one: every function
takes lengths, ints and settings, so the whole decision can be made (and tested) from the scanned lengths alone.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import NamedTuple


class OverLengthPolicy(NamedTuple):
    """What ``--seq.over_length NAME`` does with a sample longer than max_seq_length. Every part of the run asks the
    policy, never compares its name: a new policy is an entry in ``OVER_LENGTH`` (and its tests)."""

    cuts: bool  # the sample is trained on, cut to max_seq_length (--seq.truncate_from)
    leaves_out: bool  # the sample is left out, and kept in dropped_samples.jsonl
    verb: str  # what a warning says it does ("--seq.over_length drop leaves out 3 of 9 train samples ...")

    @property
    def stops(self) -> bool:  # an over-long sample stops the run before anything is built
        return not (self.cuts or self.leaves_out)


OVER_LENGTH = {
    "truncate": OverLengthPolicy(cuts=True, leaves_out=False, verb="truncates"),
    "drop": OverLengthPolicy(cuts=False, leaves_out=True, verb="leaves out"),
    "error": OverLengthPolicy(cuts=False, leaves_out=False, verb="stops on"),
}
OVER_LENGTH_POLICIES = tuple(OVER_LENGTH)
TRUNCATE_FROM = ("prompt", "end")


class LengthError(ValueError):
    """Settings or data the length decision cannot work with; the message names the flag that changes the outcome."""


# --- A sample's parts: prompt and response lengths, and which prompt tokens are template ------------------------------
class SampleParts(NamedTuple):
    """Token counts of one untruncated sample: ``prompt + response`` is ``len(dataset[i]["input_ids"])``."""

    prompt: int  # the encoded prompt (template + user text, with BOS when the tokenizer adds it)
    response: int  # the encoded response, EOS included
    head: int  # leading prompt tokens that belong to the template (system text, "### Instruction:" ...)
    marker: int  # trailing prompt tokens that belong to the template (the response marker, "### Response:" ...)

    @property
    def length(self) -> int:
        return self.prompt + self.response


def template_bounds(prompt_ids: Sequence[int], placeholder_ids: Sequence[Sequence[int]]) -> tuple[int, int]:
    """``(head, marker)``: the leading and trailing tokens of ``prompt_ids`` shared with every placeholder prompt.

    The placeholder prompts differ from the prompt only in the user text, so what they all share with it at the start
    and at the end is template. Found on the encoded prompt, never by encoding pieces (BPE merges across piece
    boundaries): a token in which template and user text merged belongs to the user text. ``head + marker`` never
    exceeds ``len(prompt_ids)``.
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


# --- The decision -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    max_seq_length: int
    source: str  # "auto" (from the data) or "override" (--train.max_seq_length)
    longest: int
    longest_split: str
    headroom: float
    block_size: int
    capped: bool  # the wanted value was above block_size and was lowered to it
    wanted: int  # the value before the cap

    def summary(self) -> str:
        if self.source == "override":
            why = f"--train.max_seq_length {self.wanted}"
            why += f", capped at block_size {self.block_size}" if self.capped else f"; block_size {self.block_size}"
            return f"max_seq_length = {self.max_seq_length} ({why}; longest {self.longest} in {self.longest_split})"
        why = f"longest {self.longest} in {self.longest_split}, +{self.headroom * 100:g}% headroom"
        if self.capped:
            why += f" = {self.wanted}, capped at block_size {self.block_size}"
        else:
            why += f"; block_size {self.block_size}"
        return f"max_seq_length = {self.max_seq_length} ({why})"


def check_settings(headroom: float, override: int | None, over_length: str, truncate_from: str = "prompt") -> None:
    """Fail early, with the flag to change, on settings that can never work."""
    if not (isinstance(headroom, (int, float)) and headroom >= 0 and math.isfinite(headroom)):
        raise LengthError(
            f"--seq.headroom must be a number >= 0 (0.1 means 10% above the longest sample), got {headroom!r}."
        )
    if override is not None and override < 1:
        raise LengthError(
            f"--train.max_seq_length must be at least 1 (or left unset to size it from the data), got {override}."
        )
    if over_length not in OVER_LENGTH_POLICIES:
        raise LengthError(f"--seq.over_length must be one of {', '.join(OVER_LENGTH_POLICIES)}, got {over_length!r}.")
    if truncate_from not in TRUNCATE_FROM:
        raise LengthError(f"--seq.truncate_from must be one of {', '.join(TRUNCATE_FROM)}, got {truncate_from!r}.")


def decide_max_seq_length(
    lengths_by_split: Mapping[str, Sequence[int]], block_size: int, headroom: float = 0.1, override: int | None = None
) -> Decision:
    """The max_seq_length to train with.

    Without an override: ``min(block_size, ceil(longest * (1 + headroom)))`` over every split. With one: the
    override, lowered to block_size if above it.
    """
    longest, longest_split = max((max(lengths), split) for split, lengths in lengths_by_split.items() if lengths)
    if override is not None:
        wanted, source = override, "override"
    else:
        # Fraction(repr(...)) keeps 0.1 as exactly 1/10, so 100 * 1.1 is 110, not 110.00000000000001 -> 111.
        wanted, source = math.ceil(longest * (1 + Fraction(repr(float(headroom))))), "auto"
    return Decision(
        max_seq_length=min(wanted, block_size),
        source=source,
        longest=longest,
        longest_split=longest_split,
        headroom=headroom,
        block_size=block_size,
        capped=wanted > block_size,
        wanted=wanted,
    )


# --- Over-length samples ----------------------------------------------------------------------------------------------
def over_limit(lengths: Sequence[int], limit: int) -> list[int]:
    """Indices of the samples longer than ``limit``: the one place that says which samples do not fit."""
    return [i for i, n in enumerate(lengths) if n > limit]


def cut_by(lengths: Sequence[int], limit: int) -> tuple[int, int]:
    """What ``limit`` cuts from ``lengths``: (samples longer than it, tokens beyond it)."""
    over = [lengths[i] for i in over_limit(lengths, limit)]
    return len(over), sum(over) - limit * len(over)


def over_length_error(
    lengths_by_split: Mapping[str, Sequence[int]], decision: Decision, shown: int = 5, where=None
) -> str | None:
    """The message for ``--seq.over_length error``, or None when every sample fits. ``where(split, index)`` (when
    given) names a sample's place in the user's file, e.g. "position 10 of /data/all.json"."""
    offenders = [
        (split, i, lengths[i])
        for split, lengths in lengths_by_split.items()
        for i in over_limit(lengths, decision.max_seq_length)
    ]
    if not offenders:
        return None
    listed = ", ".join(
        f"{split}[{i}] = {n}" + (f" ({where(split, i)})" if where else "") for split, i, n in offenders[:shown]
    )
    more = f" and {len(offenders) - shown} more" if len(offenders) > shown else ""
    return (
        f"{len(offenders)} sample(s) are longer than max_seq_length {decision.max_seq_length}"
        f" ({decision.summary()}): {listed}{more}.\n" + over_length_fix(decision)
    )


def over_length_fix(decision: Decision) -> str:
    """The advice ending an over-length error, naming only flags that can help: raising the limit cannot help once it
    is the model's block_size, and --seq.headroom does nothing under --train.max_seq_length."""
    policies = "--seq.over_length truncate (cut them) or --seq.over_length drop (leave them out)"
    if decision.max_seq_length >= decision.block_size:
        return f"max_seq_length is the model's block_size {decision.block_size}, so no limit can keep them whole: use {policies}."
    # Sized from the data, the limit is below the longest sample only when capped: so here it is an override.
    return f"Raise --train.max_seq_length (up to block_size {decision.block_size}), or use {policies}."


def apply_over_length(
    lengths_by_split: Mapping[str, Sequence[int]], decision: Decision, policy: str, where=None
) -> dict[str, list[int]]:
    """The indices each split keeps under ``--seq.over_length``; raises for ``error`` with an over-long sample, and for
    ``drop`` when it would empty the train or val split."""
    rule = OVER_LENGTH[policy]
    if rule.stops and (message := over_length_error(lengths_by_split, decision, where=where)):
        raise LengthError(message)
    if not rule.leaves_out:
        return {split: list(range(len(lengths))) for split, lengths in lengths_by_split.items()}
    kept = {}
    for split, lengths in lengths_by_split.items():
        over = set(over_limit(lengths, decision.max_seq_length))
        kept[split] = [i for i in range(len(lengths)) if i not in over]
    for split in ("train", "val"):
        if split in kept and not kept[split]:
            raise LengthError(
                f"--seq.over_length {policy} leaves the {split} split empty: all {len(lengths_by_split[split])} samples are longer"
                f" than max_seq_length {decision.max_seq_length}. {_keep_them(decision)}"
            )
    return kept


def _keep_them(decision: Decision) -> str:
    if decision.max_seq_length >= decision.block_size:
        return (
            f"That is the model's block_size {decision.block_size}: use --seq.over_length truncate, or shorter samples."
        )
    return f"Raise --train.max_seq_length (up to block_size {decision.block_size}) or use --seq.over_length truncate."


def longest_batch(lengths: Sequence[int], batch_size: int) -> list[int]:
    """Indices of the ``batch_size`` longest samples (fewer if there are fewer samples), longest first.

    Padded to the longest of them and cut at max_seq_length, they make the largest micro-batch a loader of
    this batch size can produce: the worst case the rehearsal runs. Ties go to the lower index.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))[:batch_size]


# --- The report -------------------------------------------------------------------------------------------------------
def percentile(sorted_lengths: Sequence[int], p: float) -> int:
    """Nearest-rank percentile: the smallest length with at least p% of the samples at or below it."""
    rank = max(1, math.ceil(p / 100 * len(sorted_lengths)))
    return sorted_lengths[rank - 1]


def tail_start(lengths: Sequence[int]) -> int:
    """The length beyond which a sample lies far from the rest (the tail a length picture must show): the larger of
    Tukey's far-out fence, Q3 + 3 × (Q3 - Q1), and twice the median, with nearest-rank quantiles. ``lengths``: not
    empty."""
    ordered = sorted(lengths)
    q1, median, q3 = (percentile(ordered, p) for p in (25, 50, 75))
    return max(q3 + 3 * (q3 - q1), 2 * median)


def split_stats(lengths: Sequence[int], limit: int) -> dict:
    """Count, spread, and what ``limit`` does to one split (an empty split has only its count)."""
    if not lengths:
        empty = dict.fromkeys(("min", "mean", "p50", "p90", "p99", "max", "argmax"))
        return {"count": 0, **empty, "over_limit": 0, "tokens_truncated": 0}
    ordered = sorted(lengths)
    longest = ordered[-1]
    samples_cut, tokens_cut = cut_by(lengths, limit)
    return {
        "count": len(lengths),
        "min": ordered[0],
        "mean": round(sum(lengths) / len(lengths), 2),
        "p50": percentile(ordered, 50),
        "p90": percentile(ordered, 90),
        "p99": percentile(ordered, 99),
        "max": longest,
        "argmax": lengths.index(longest),
        "over_limit": samples_cut,
        "tokens_truncated": tokens_cut,
    }


def what_if(lengths: Sequence[int], block_size: int, chosen: int | None = None) -> list[dict]:
    """For candidate limits, the share of samples and of tokens that a limit would cut.

    Candidates: powers of two from 128 up to block_size, the data's own p90, p95, p99 and max, and the
    ``chosen`` max_seq_length of this run when given.
    """
    ordered = sorted(lengths)
    total_tokens = sum(ordered)
    labels: dict[int, list[str]] = {} if chosen is None else {chosen: ["chosen"]}
    power = 128
    while power <= block_size:
        labels.setdefault(power, [])
        power *= 2
    for name, value in (
        ("p90", percentile(ordered, 90)),
        ("p95", percentile(ordered, 95)),
        ("p99", percentile(ordered, 99)),
        ("max", ordered[-1]),
    ):
        labels.setdefault(value, []).append(name)
    rows = []
    for limit in sorted(labels):
        samples_cut, tokens_cut = cut_by(ordered, limit)
        rows.append(
            {
                "max_seq_length": limit,
                "label": "/".join(labels[limit]),
                "samples_cut": samples_cut,
                "samples_cut_share": samples_cut / len(ordered),
                "tokens_cut": tokens_cut,
                "tokens_cut_share": tokens_cut / total_tokens,
            }
        )
    return rows


# --- Optimizer steps, and length-grouped batching (--seq.group_by_length) ---------------------------------------------
def rank_steps(order: Sequence, step_size: int, rank: int = 0, world_size: int = 1) -> list[list]:
    """This rank's optimizer steps, ``step_size`` items each, from ``order``: one epoch's items of all ranks.

    ``order`` is cut into steps of all ranks (``step_size x world_size`` items), the last one filled up by repeating
    items from the start of ``order`` (as ``DistributedSampler`` repeats samples; cyclically when ``order`` is shorter),
    and rank ``r`` takes the items ``r, r + world_size, ...`` of each. So every item is seen at least once, only the
    epoch's last step repeats any, and the epoch holds a whole number of steps on every rank.
    """
    if step_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad step settings: {step_size=}, {rank=}, {world_size=}")
    span = step_size * world_size
    items = list(order) + [order[i % len(order)] for i in range(-len(order) % span)]
    return [items[start + rank : start + span : world_size] for start in range(0, len(items), span)]


def micro_batches(steps: Sequence[Sequence], micro_batch_size: int) -> list[list]:
    """Each step cut into consecutive micro-batches of ``micro_batch_size`` (a step's last one is shorter when the
    size does not divide the step): a micro-batch never holds samples of two steps."""
    if micro_batch_size < 1:
        raise ValueError(f"bad micro_batch_size: {micro_batch_size}")
    return [list(step[j : j + micro_batch_size]) for step in steps for j in range(0, len(step), micro_batch_size)]


def grouped_batches(
    lengths: Sequence[int],
    micro_batch_size: int,
    seed: int,
    epoch: int,
    megabatch_size: int = 50,
    rank: int = 0,
    world_size: int = 1,
    step_size: int | None = None,
) -> list[list[int]]:
    """This rank's micro-batches (lists of sample indices) for one epoch, grouped by length at step granularity.

    A step is ``step_size`` samples per rank (``micro_batch_size`` when not given). The samples are shuffled and cut
    into megabatches of ``megabatch_size`` steps (rounded up to a multiple of ``world_size``), each megabatch is sorted
    by length (longest first) and cut into steps of all ranks (``step_size x world_size`` samples), and these steps are
    shuffled: a step holds samples of similar length, and rank ``r`` takes its samples ``r, r + world_size, ...`` (the
    ranks of a step get alike shares). When the samples do not fill the last step, it is filled by repeating samples
    from the start of the epoch's shuffled order, sorted again, and kept last: every sample is seen at least once,
    and only that step repeats any. Each step is then cut into consecutive micro-batches (``micro_batches``), so a
    micro-batch holds samples of similar length, longest first. Everything depends only on ``(seed, epoch)``: every
    rank computes the same steps, and they are the same for every ``micro_batch_size``.
    """
    step_size = step_size or micro_batch_size
    if step_size < 1 or megabatch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"bad grouping settings: {step_size=}, {megabatch_size=}, {rank=}, {world_size=}")
    rng = random.Random(f"group_by_length/{seed}/{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    span = step_size * world_size  # one step of every rank
    megabatch = span * math.ceil(megabatch_size / world_size)  # so no step straddles two megabatches

    def longest_first(indices: list[int]) -> list[int]:
        return sorted(indices, key=lambda i: lengths[i], reverse=True)

    ordered = [i for start in range(0, len(order), megabatch) for i in longest_first(order[start : start + megabatch])]
    whole = len(order) - len(order) % span
    steps = [ordered[start : start + span] for start in range(0, whole, span)]
    rng.shuffle(steps)
    if whole < len(order):
        steps.append(longest_first(ordered[whole:] + [order[i % len(order)] for i in range(whole + span - len(order))]))
    return micro_batches([step[rank::world_size] for step in steps], micro_batch_size)


def padding_efficiency(
    batches: Sequence[Sequence[int]], lengths: Sequence[int], max_seq_length: int | None = None
) -> dict:
    """Real and padded tokens of ``batches`` (index lists into ``lengths``), as the model receives them.

    A micro-batch is padded to its longest sample, and every sample is cut at ``max_seq_length`` (when given):
    real = sum of min(length, max_seq_length); padded = sum over batches of size x min(longest, max_seq_length).
    """
    cap = max_seq_length if max_seq_length is not None else math.inf
    real = padded = 0
    for batch in batches:
        if not batch:
            continue
        cut = [min(lengths[i], cap) for i in batch]
        real += sum(cut)
        padded += len(cut) * max(cut)
    return {
        "count": len(batches),
        "real_tokens": int(real),
        "padded_tokens": int(padded),
        "efficiency": real / padded if padded else 1.0,
    }
