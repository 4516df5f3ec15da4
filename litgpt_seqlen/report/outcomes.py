"""Outcomes that run but train on little or nothing: warnings, printed and kept in the report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import data_utils

MAX_CUT_SHARE = 0.10  # above this share of a split dropped or truncated, the run warns


def min_prompt_length(prompt_style, tokenizer) -> int:
    """Tokens of the prompt template alone: the style applied to an empty instruction (and no input), encoded as
    SFTDataset encodes a prompt (with BOS when the tokenizer adds one)."""
    return len(tokenizer.encode(prompt_style.apply(prompt="", input="")))


def outcome_warnings(
    lengths: Mapping[str, Sequence[int]],
    decision: data_utils.Decision,
    over_length: str,
    template_length: int,
    unsupervised: Mapping[str, Sequence[int]] | None = None,
    where=None,
    max_cut_share: float = MAX_CUT_SHARE,
) -> list[dict]:
    """Warnings for a run that would train on little or nothing, as dicts for ``seq_lengths.json`` (``kind``,
    ``message`` and the figures); ``warning_lines`` prints them.

    - ``cut_share``: more than ``max_cut_share`` of a split dropped (drop) or truncated (truncate);
    - ``shorter_than_template``: max_seq_length leaves no room for a response after the prompt template;
    - ``no_supervised_token``: the samples of ``unsupervised`` (per split, the indices the cut left with no token to
      learn from, which the plan leaves out), named.

    ``where(split, index)`` (e.g. ``DataFiles.where``) names a sample in the user's file.
    """
    limit = decision.max_seq_length
    found = []
    if not data_utils.OVER_LENGTH[over_length].stops:
        for split, split_lengths in lengths.items():
            over = data_utils.over_limit(split_lengths, limit)
            if split_lengths and len(over) / len(split_lengths) > max_cut_share:
                found.append(_cut_share_warning(split, len(over), len(split_lengths), over_length, decision))
    if limit <= template_length:
        found.append(
            {
                "kind": "shorter_than_template",
                "max_seq_length": limit,
                "template_length": template_length,
                "message": f"max_seq_length {limit} leaves no room for a response: the prompt template alone takes"
                f" {template_length} tokens (--data.prompt_style), so every sample is cut inside its prompt. Raise --train.max_seq_length.",
            }
        )
    for split, indices in (unsupervised or {}).items():
        if indices:
            found.append(_no_supervised_warning(split, sorted(indices), len(lengths[split]), limit, where))
    return found


def _cut_share_warning(split: str, count: int, total: int, over_length: str, decision: data_utils.Decision) -> dict:
    verb = data_utils.OVER_LENGTH[over_length].verb
    if decision.source == "override" and not decision.capped:
        fix = f"Raise --train.max_seq_length (up to block_size {decision.block_size}); the what-if table shows what each length costs."
    else:
        fix = (
            f"They are longer than the model's block_size {decision.block_size}: only shorter samples or a model with a"
            " longer context can keep them."
        )
    return {
        "kind": "cut_share",
        "split": split,
        "count": count,
        "of": total,
        "share": round(count / total, 4),
        "over_length": over_length,
        "message": f"--seq.over_length {over_length} {verb} {count} of {total} {split} samples ({count / total:.0%}), longer than"
        f" max_seq_length {decision.max_seq_length}. {fix}",
    }


def _no_supervised_warning(split: str, indices: list[int], total: int, limit: int, where) -> dict:
    named = ", ".join(f"{split}[{i}]" + (f" ({where(split, i)})" if where else "") for i in indices[:3])
    more = f" and {len(indices) - 3} more" if len(indices) > 3 else ""
    return {
        "kind": "no_supervised_token",
        "split": split,
        "count": len(indices),
        "of": total,
        "indices": indices,
        "message": f"{len(indices)} of {total} {split} samples have no token to learn from once cut to max_seq_length"
        f" {limit}, so they are left out (listed in dropped_samples.jsonl): {named}{more}. Raise --train.max_seq_length,"
        " or shorten these samples.",
    }


def warning_lines(warnings: Sequence[dict]) -> list[str]:
    return [f"warning: {w['message']}" for w in warnings]


def plan_warnings(plan, data, tokenizer, over_length: str) -> list[dict]:
    """``outcome_warnings`` for a ``LengthPlan``: the template length from the data module's prompt style (other data
    modules, without one, skip that check), the samples the plan left out for want of a target, named by their place
    in the user's files when known."""
    prompt_style = getattr(data, "prompt_style", None)
    template = min_prompt_length(prompt_style, tokenizer) if prompt_style is not None else 0
    unsupervised = {
        split: [i for i, reason in reasons.items() if reason == "unsupervised"]
        for split, reasons in plan.dropped.items()
    }
    return outcome_warnings(
        plan.lengths,
        plan.decision,
        over_length,
        template,
        unsupervised,
        where=plan.located.where if plan.located else None,
    )
