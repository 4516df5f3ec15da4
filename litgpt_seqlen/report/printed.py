"""The report as the terminal shows it: the decision, the split tables, the what-if table, the histograms."""

from __future__ import annotations

import lightning as L

import data_utils
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
    fabric.print(data_utils.format_what_if(report["what_if"], decision.block_size))
    for name, split_lengths in plan.lengths.items():
        fabric.print(f"lengths in {name}:")
        fabric.print(data_utils.histogram(split_lengths, decision.max_seq_length, decision.block_size))
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
