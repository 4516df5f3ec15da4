"""The report as the terminal shows it: the decision, the split tables, the what-if table, the histograms."""

from __future__ import annotations

import math
from collections.abc import Sequence

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
    extra = ("dropped",) if data_utils.OVER_LENGTH[report["over_length"]].leaves_out else ()
    print_table(fabric, report["splits"], columns + extra)
    fabric.print(f"cut samples (--seq.truncate_from {report['truncate_from']}):")
    print_table(fabric, report["splits"], TRUNCATION_KEYS)
    fabric.print(format_what_if(report["what_if"], decision.block_size))
    for name, split_lengths in plan.lengths.items():
        fabric.print(f"lengths in {name}:")
        fabric.print(histogram(split_lengths, decision.max_seq_length, decision.block_size, split=name))
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


def histogram(
    lengths: Sequence[int], max_seq_length: int, block_size: int, bins: int = 9, width: int = 40, split: str = ""
) -> str:
    """A terminal histogram of lengths that shows the tail: even bins over the bulk, then the samples far beyond it
    (``data_utils.tail_start``), one line per length with the sample's index when there are few, else in widening
    bins. max_seq_length and block_size are marked where they fall. At most ``bins`` bin lines, 3 more lines."""
    if not lengths:
        return "  (no samples)"
    fence = data_utils.tail_start(lengths)
    tail = sorted((n, i) for i, n in enumerate(lengths) if n > fence)
    tail_rows = _tail_rows(tail, max(1, min(4, bins // 2)), split)
    rows = _bulk_rows([n for n in lengths if n <= fence], bins - len(tail_rows), fence) + tail_rows
    if tail:
        rows.insert(len(rows) - len(tail_rows), (None, f"{len(tail)} far beyond the rest:"))
    peak = max(row[2] for row in rows if row[0] is not None)
    limits = [(max_seq_length, "max_seq_length"), (block_size, "block_size")]
    if max_seq_length == block_size:
        limits = [(block_size, "max_seq_length = block_size =")]
    lines = []
    for row in rows:
        if row[0] is None:
            lines.append(f"  {row[1]}")
            continue
        lo, hi, count, note = row
        lines += [f"  {'':>13} -- {name} {value} --" for value, name in limits if value < lo]
        marks = [f"{name} {value}" for value, name in limits if lo <= value <= hi]
        limits = [limit for limit in limits if limit[0] > hi]
        label = f"{lo:>6}-{hi:<6}" if hi > lo else f"{lo:>6}{'':7}"
        bar = "#" * math.ceil(width * count / peak) if count else ""
        line = f"  {label} {bar:<{width}} {count:>7}" + (f"  {note}" if note else "")
        lines.append(line + (f"  <- {', '.join(marks)}" if marks else ""))
    if limits:
        verb = "is" if len(limits) == 1 else "are"
        lines.append(
            f"  ({' and '.join(f'{name} {value}' for value, name in limits)} {verb} beyond the longest sample)"
        )
    return "\n".join(lines)


def _bulk_rows(lengths: Sequence[int], bins: int, top: int) -> list[tuple[int, int, int, str]]:
    """Even bins with round edges (a step of 1, 2, 2.5 or 5 times a power of ten), at most ``bins`` of them, the
    last ending at ``top`` when it would reach past it."""
    low, high = min(lengths), max(lengths)
    scale = 1
    while True:
        for factor in (1, 2, 2.5, 5):
            step = int(factor * scale)
            if step == factor * scale and math.ceil((high + 1 - low // step * step) / step) <= max(1, bins):
                start = low // step * step
                edges = range(start, high + 1, step)
                return [(lo, min(lo + step - 1, top), sum(lo <= n < lo + step for n in lengths), "") for lo in edges]
        scale *= 10


def _tail_rows(tail: Sequence[tuple[int, int]], most: int, split: str) -> list[tuple[int, int, int, str]]:
    """The tail's lines: one per length, naming its samples, when ``most`` lines hold it; else ``most`` bins with
    edges spaced evenly on a log scale, each listing its lengths when it holds at most three."""
    if not tail:
        return []
    distinct = sorted({n for n, _ in tail})
    if len(distinct) <= most:
        rows = []
        for n in distinct:
            where = [f"{split}[{i}]" if split else f"#{i}" for m, i in tail if m == n]
            shown = ", ".join(where[:3]) + (", ..." if len(where) > 3 else "")
            rows.append((n, n, len(where), shown))
        return rows
    low, high = distinct[0], distinct[-1]
    edges = [round(low * (high / low) ** (k / most)) for k in range(most)] + [high + 1]
    rows = []
    for lo, stop in zip(edges, edges[1:]):
        inside = [n for n, _ in tail if lo <= n < stop]
        if inside:
            listed = ", ".join(map(str, inside)) if len(inside) <= 3 else ""
            rows.append((lo, stop - 1, len(inside), listed))
    return rows
