"""The length picture, ``seq_lengths.png`` beside ``seq_lengths.json``: the report for a user who would rather look.

One histogram per split, then one what-if panel: the share of samples, of tokens and of response tokens that each
candidate max_seq_length would cut. A length picture exists to show the tail, so the histograms have log-scaled
axes (a bin of one sample stands out beside a bin of thousands), the samples far beyond the rest
(``data_utils.tail_start``) are marked one by one and listed in the panel's title, p50, p90, p99 and max are ticks on
the top axis, and max_seq_length and block_size are lines of their own colour and style, each labelled. The legend
sits above the panels, clear of the data. matplotlib is an optional extra: without it ``write_length_picture``
writes nothing and returns the line that says how to get the picture, and the run goes on.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

import data_utils
from litgpt_seqlen.checkpoint.atomic import write_file_atomically

PLOT_HINT = "pip install matplotlib (from a clone: pip install '.[plot]') to get {name}"
BINS = 40  # histogram bins, evenly spaced on the log axis from the shortest sample to the longest
DECISION_COLOR = "tab:red"
BLOCK_COLOR = "black"
TAIL_COLOR = "tab:orange"
TAIL_LISTED = 6  # the tail's lengths a title lists; a longer tail is summarised
DATA_HEIGHT = 0.6  # share of a histogram's height the bars may fill: the top is kept for the limits' labels
MIN_GAP = 0.075  # labelled ticks closer than this share of an axis's width are dropped ...
QUANTILE_GAP = 0.13  # ... and quantile labels (wider: "p99 2200") closer than this share one label


def length_figure(
    lengths_by_split: Mapping[str, Sequence[int]],
    max_seq_length: int,
    block_size: int,
    what_if_rows: Sequence[Mapping],
):
    """A ``matplotlib.figure.Figure`` (Agg canvas): a histogram per split, in order, then the what-if panel.

    ``lengths_by_split``: every sample's untruncated length per split (an empty split gets an empty panel).
    ``what_if_rows``: ``data_utils.what_if`` rows (``max_seq_length``, ``samples_cut_share``, ``tokens_cut_share``),
    with ``response_tokens_cut_share`` when ``truncation.add_response_cut`` added it.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    splits = list(lengths_by_split)
    figure = Figure(figsize=(8, 2.7 * (len(splits) + 1) + 0.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(splits) + 1, 1, squeeze=False)[:, 0]

    # The same bins and range for every split, so the panels compare at a glance.
    every = [n for lengths in lengths_by_split.values() for n in lengths]
    shortest, longest = (min(every), max(every)) if every else (max_seq_length, max_seq_length)
    edges = np.unique(np.round(np.geomspace(max(1, shortest), longest + 1, BINS + 1)))
    xlim = (max(1, min(shortest, max_seq_length)) / 1.15, max(longest, max_seq_length) * 1.15)
    for ax, split in zip(axes, splits):
        _histogram(ax, split, list(lengths_by_split[split]), edges, xlim)
        _limit_lines(ax, max_seq_length, block_size if block_size <= xlim[1] else None)
    if splits:
        axes[len(splits) - 1].set_xlabel("tokens per sample (untruncated, log scale)")
    _what_if(axes[-1], what_if_rows, max_seq_length)

    # One legend for every panel, above them all: it hides no bar, marker or curve.
    entries = {}
    for ax in axes:
        entries.update((label, handle) for handle, label in zip(*ax.get_legend_handles_labels()))
    figure.legend(entries.values(), entries.keys(), loc="outside upper center", ncols=min(3, len(entries) or 1))
    return figure


def _histogram(ax, split: str, lengths: list[int], edges, xlim: tuple[float, float]) -> None:
    """One split: log-scaled counts over a log-scaled length axis, the tail marked, the quantiles on the top axis."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    counts, _, _ = ax.hist(lengths, bins=edges, color="tab:blue", label="samples per bin")
    ax.set_xscale("log", base=2)
    ax.set_xlim(*xlim)
    _plain_ticks(ax.xaxis, xlim, [2**k for k in range(math.ceil(math.log2(xlim[0])), int(math.log2(xlim[1])) + 1)])
    peak = max(1.0, float(max(counts, default=0)))
    ax.set_ylim(0.5, 0.5 * (peak * 1.8 / 0.5) ** (1 / DATA_HEIGHT))  # 1 sample stands 0.5 .. 1: visible
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_ylabel("samples (log scale)")
    if not lengths:
        ax.set_title(f"{split}: no samples", loc="left", fontsize="medium")
        return
    fence = data_utils.tail_start(lengths)
    tail = sorted(n for n in lengths if n > fence)
    title = f"{split}: {len(lengths)} samples, longest {max(lengths)}"
    if tail:
        bins = np.clip(np.searchsorted(edges, tail, side="right") - 1, 0, len(counts) - 1)
        ax.plot(tail, counts[bins] * 1.6, "v", color=TAIL_COLOR, markersize=6, label="a sample far beyond the rest")
        listed = ", ".join(map(str, tail)) if len(tail) <= TAIL_LISTED else f"{tail[0]} to {tail[-1]}"
        title += f"\n{len(tail)} far beyond the rest (\u25bc): {listed}"
    ax.set_title(title, loc="left", fontsize="medium")
    ordered = sorted(lengths)
    quantiles = [(name, data_utils.percentile(ordered, p)) for name, p in (("p50", 50), ("p90", 90), ("p99", 99))]
    _quantile_ticks(ax, [*quantiles, ("max", ordered[-1])], xlim)


def _quantile_ticks(ax, quantiles: list[tuple[str, int]], xlim: tuple[float, float]) -> None:
    """p50, p90, p99 and max as ticks on a top axis, each labelled with its value; close ones share one label."""
    groups: list[list[tuple[str, int]]] = []
    span = math.log2(xlim[1] / xlim[0])
    for name, value in quantiles:
        if groups and math.log2(value / groups[-1][0][1]) < QUANTILE_GAP * span:
            groups[-1].append((name, value))
        else:
            groups.append([(name, value)])
    ticks, labels = [], []
    for group in groups:
        by_value: dict[int, list[str]] = {}
        for name, value in group:
            by_value.setdefault(value, []).append(name)
        ticks += list(by_value)
        labels += ["\n".join(f"{'/'.join(names)} {value}" for value, names in by_value.items())]
        labels += [""] * (len(by_value) - 1)
    top = ax.secondary_xaxis("top")
    top.set_xticks(ticks, labels)
    top.minorticks_off()
    top.tick_params(labelsize="small", colors="dimgray")


def _limit_lines(ax, max_seq_length: int, block_size: int | None) -> None:
    """max_seq_length (red, dashed) and block_size (black, dotted; only when inside the axis), each labelled at the
    top beside its line; when they are equal the dotted line runs over the dashed one and one label names both."""
    decision = f"max_seq_length {max_seq_length}"
    ax.axvline(max_seq_length, color=DECISION_COLOR, linestyle="--", linewidth=1.8, label=decision)
    if block_size is not None:
        ax.axvline(block_size, color=BLOCK_COLOR, linestyle=":", linewidth=1.8, label=f"block_size {block_size}")
    if block_size == max_seq_length:
        labels = [(max_seq_length, f"max_seq_length = block_size = {block_size}", DECISION_COLOR, 0.97)]
    else:
        labels = [(max_seq_length, decision, DECISION_COLOR, 0.97)]
        if block_size is not None:
            labels.append((block_size, f"block_size {block_size}", BLOCK_COLOR, 0.84))
    low, high = (math.log2(limit) for limit in ax.get_xlim())
    for x, text, color, height in labels:
        right = (math.log2(x) - low) / (high - low) < 0.4  # near the left edge: the label goes right of its line
        ax.annotate(
            text,
            (x, height),
            xycoords=("data", "axes fraction"),
            xytext=(4 if right else -4, 0),
            textcoords="offset points",
            ha="left" if right else "right",
            va="top",
            color=color,
            fontsize="small",
            bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.8},
        )


def _what_if(ax, what_if_rows: Sequence[Mapping], max_seq_length: int) -> None:
    """The cost of each candidate limit, the decision marked and labelled on whichever side has room."""
    from matplotlib.ticker import PercentFormatter

    rows = sorted(what_if_rows, key=lambda row: row["max_seq_length"])
    limits = [row["max_seq_length"] for row in rows]
    curves = [("samples_cut_share", "samples cut", "o"), ("tokens_cut_share", "tokens cut", "s")]
    if rows and all("response_tokens_cut_share" in row for row in rows):
        curves.append(("response_tokens_cut_share", "response tokens cut", "^"))
    for key, label, marker in curves:
        ax.plot(limits, [row[key] for row in rows], marker=marker, markersize=4, label=label)
    ax.axvline(max_seq_length, color=DECISION_COLOR, linestyle="--", label=f"max_seq_length {max_seq_length}")
    right = True
    if limits and min(limits) > 0:
        ax.set_xscale("log", base=2)  # candidates are powers of two, labelled as plain numbers
        xlim = (min(limits + [max_seq_length]) / 1.15, max(limits + [max_seq_length]) * 1.15)
        ax.set_xlim(*xlim)
        powers = [limit for limit in limits if limit & (limit - 1) == 0]
        _plain_ticks(ax.xaxis, xlim, [limits[-1], max_seq_length, *powers])  # the decision is also annotated
        right = math.log2(max_seq_length / xlim[0]) < 0.5 * math.log2(xlim[1] / xlim[0])
    chosen = next((row for row in rows if row["max_seq_length"] == max_seq_length), None)
    if chosen is not None:  # at the top, where the falling curves leave room, unless the chosen point is there
        share = chosen["samples_cut_share"]
        ax.annotate(
            f"{max_seq_length}: {share:.1%} of samples cut",
            (max_seq_length, 0.97 if share < 0.7 else 0.55),
            xycoords=("data", "axes fraction"),
            xytext=(4 if right else -4, 0),
            textcoords="offset points",
            ha="left" if right else "right",
            va="top",
            color=DECISION_COLOR,
            fontsize="small",
        )
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1))
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("what if max_seq_length were ... (all splits)", loc="left", fontsize="medium")
    ax.set_xlabel("max_seq_length (log scale)")
    ax.set_ylabel("share cut")


def _plain_ticks(axis, xlim: tuple[float, float], ticks: Sequence[int], keep: Sequence[int] = ()) -> None:
    """Ticks on a log axis labelled as plain numbers: ``keep`` always, then ``ticks`` in the order given wherever no
    label is too close; the ends of the range when fewer than two would be labelled."""
    from matplotlib.ticker import NullLocator

    low, high = (math.log2(limit) for limit in xlim)
    candidates = [t for t in ticks if xlim[0] <= t <= xlim[1]]
    if len(set(candidates) | set(keep)) < 2:
        candidates += [math.ceil(xlim[0] * 1.15), int(xlim[1] / 1.15)]
    chosen = list(dict.fromkeys(keep))
    for tick in candidates:
        if all(abs(math.log2(tick / other)) >= MIN_GAP * (high - low) for other in chosen):
            chosen.append(tick)
    axis.set_ticks(sorted(chosen), [str(tick) for tick in sorted(chosen)])
    axis.set_minor_locator(NullLocator())  # unlabelled minor ticks on a log axis: many to lay out, nothing to read


def write_length_picture(
    path: str | os.PathLike,
    lengths_by_split: Mapping[str, Sequence[int]],
    max_seq_length: int,
    block_size: int,
    what_if_rows: Sequence[Mapping],
) -> str | None:
    """Writes ``length_figure`` as a PNG at ``path`` and returns None; without matplotlib writes nothing and returns
    the one-line hint (``PLOT_HINT``, naming the file). The file appears whole or not at all (written aside, then renamed)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return PLOT_HINT.format(name=Path(path).name)
    figure = length_figure(lengths_by_split, max_seq_length, block_size, what_if_rows)
    write_file_atomically(Path(path), lambda file: figure.savefig(file, format="png", dpi=100, bbox_inches="tight"))
    return None


def log_length_histograms(fabric, lengths_by_split: Mapping[str, Sequence[int]]) -> None:
    """The lengths of each split as a histogram in every logger that draws one: TensorBoard (``add_histogram``) and
    Weights & Biases (``wandb.Histogram``); the CSV logger has none and is skipped."""
    for logger in fabric.loggers:
        experiment = getattr(logger, "experiment", None)
        for split, lengths in lengths_by_split.items():
            if not lengths:
                continue
            if hasattr(experiment, "add_histogram"):
                experiment.add_histogram(f"seq/{split}_lengths", np.asarray(lengths), 0)
            elif type(logger).__name__ == "WandbLogger":
                import wandb

                experiment.log({f"seq/{split}_lengths": wandb.Histogram(list(lengths))})
