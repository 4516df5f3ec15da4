"""The report as the terminal shows it: the decision, the split tables, the what-if table, the histograms."""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning as L

from litgpt_seqlen.data.length_plan import LengthPlan

TRUNCATION_KEYS = (
    "truncated",
    "prompt_tokens_cut",
    "response_tokens_cut",
    "responses_cut",
    "eos_lost",
    "unsupervised_dropped",
)


def print_report(fabric: L.Fabric, report: dict, plan: LengthPlan) -> None:
    decision = plan.decision
    fabric.print(decision.summary())
    columns = ("count", "min", "mean", "p50", "p90", "p99", "max", "argmax", "over_limit", "tokens_truncated")
    extra = ("dropped",) if report["over_length"] == "drop" else ()
    print_table(fabric, report["splits"], columns + extra)
    fabric.print(f"cut samples (--seq.truncate_from {report['truncate_from']}):")
    print_table(fabric, report["splits"], TRUNCATION_KEYS)
    fabric.print(format_what_if(report["what_if"], decision.block_size))
    for name, split_lengths in plan.lengths.items():
        fabric.print(f"lengths in {name}:")
        fabric.print(histogram(split_lengths, decision.max_seq_length, decision.block_size))
    estimate = report["batches_estimate"]
    how = (
        f"packed, {estimate['samples_per_row']:g} samples per row"
        if estimate["packed"]
        else f"group_by_length {str(estimate['group_by_length']).lower()}"
    )
    fabric.print(
        f"train batches (estimate): {estimate['efficiency']:.1%} of the tokens real, the rest padding"
        f" (micro_batch_size {estimate['micro_batch_size']}, {how})"
    )
    expected = ", ".join(f"{how} {efficiency:.1%}" for how, efficiency in report["expected_efficiency"].items())
    fabric.print(
        f"expected share of real tokens in train batches (epoch 1, micro_batch_size {estimate['micro_batch_size']},"
        f" max_seq_length {decision.max_seq_length}): {expected} (--seq.group_by_length, --seq.pack)"
    )


def print_table(fabric: L.Fabric, splits: dict, columns: tuple[str, ...]) -> None:
    widths = [max(10, len(c)) for c in columns]
    fabric.print("  split  " + " ".join(f"{c:>{w}}" for c, w in zip(columns, widths)))
    for name, stats in splits.items():
        cells = ("-" if stats.get(c) is None else stats[c] for c in columns)
        fabric.print(f"  {name:<6} " + " ".join(f"{cell:>{w}}" for cell, w in zip(cells, widths)))


def format_what_if(rows: Sequence[dict], block_size: int) -> str:
    """The what-if table; with a last column when the rows carry ``response_tokens_cut_share``."""
    responses = bool(rows) and "response_tokens_cut_share" in rows[0]
    lines = [
        "what if max_seq_length were ...   samples cut    tokens cut" + ("  response tokens cut" if responses else "")
    ]
    for row in rows:
        label = "/".join(filter(None, [row["label"], "block_size" if row["max_seq_length"] == block_size else ""]))
        line = f"  {row['max_seq_length']:>7} {label:<20} {row['samples_cut_share']:>10.1%}  {row['tokens_cut_share']:>11.2%}"
        if responses:
            line += f"  {row['response_tokens_cut_share']:>19.2%}"
        lines.append(line)
    return "\n".join(lines)


def histogram(lengths: Sequence[int], max_seq_length: int, block_size: int, bins: int = 12, width: int = 40) -> str:
    """A terminal histogram of lengths, with the bins that hold max_seq_length and block_size marked."""
    if not lengths:
        return "  (no samples)"
    top = max(max(lengths), max_seq_length)
    step = max(1, math.ceil(top / bins))
    counts = [0] * math.ceil((top + 1) / step)
    for n in lengths:
        counts[n // step] += 1
    peak = max(counts)
    lines = []
    for b, count in enumerate(counts):
        lo, hi = b * step, (b + 1) * step - 1
        marks = [
            f"{name} {value}"
            for name, value in (("max_seq_length", max_seq_length), ("block_size", block_size))
            if lo <= value <= hi
        ]
        bar = "#" * math.ceil(width * count / peak) if count else ""
        lines.append(f"  {lo:>6}-{hi:<6} {bar:<{width}} {count:>7}" + (f"  <- {', '.join(marks)}" if marks else ""))
    if block_size > top:
        lines.append(f"  (block_size {block_size} is beyond the longest sample)")
    return "\n".join(lines)
