"""The length picture, ``seq_lengths.png`` beside ``seq_lengths.json``: the report for a user who would rather look.

One histogram per split with the decided max_seq_length marked, and one what-if panel: the share of samples, of
tokens and of response tokens that each candidate max_seq_length would cut, with the decision marked. matplotlib is
an optional extra (``pip install 'litgpt-seqlen[plot]'``): without it ``write_length_picture`` writes nothing and
returns the line that says how to get the picture, and the run goes on.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

PLOT_HINT = "pip install 'litgpt-seqlen[plot]' (matplotlib) to get seq_lengths.png"
BINS = 40  # histogram bins over 0 .. max(longest sample, max_seq_length)
DECISION_COLOR = "tab:red"


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
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    splits = list(lengths_by_split)
    figure = Figure(figsize=(8, 2.4 * (len(splits) + 1) + 0.4), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(splits) + 1, 1, squeeze=False)[:, 0]
    decision = f"max_seq_length {max_seq_length}"

    # Histograms: the same bins for every split, so the panels compare at a glance.
    longest = max((max(lengths) for lengths in lengths_by_split.values() if lengths), default=0)
    top = max(longest, max_seq_length)
    width = max(1, math.ceil((top + 1) / BINS))
    edges = list(range(0, top + width + 1, width))
    for ax, split in zip(axes, splits):
        lengths = list(lengths_by_split[split])
        ax.hist(lengths, bins=edges, color="tab:blue")
        ax.axvline(max_seq_length, color=DECISION_COLOR, linestyle="--", label=decision)
        if block_size <= edges[-1]:
            ax.axvline(block_size, color="black", linestyle=":", label=f"block_size {block_size}")
        shown = f"{len(lengths)} samples, longest {max(lengths)}" if lengths else "no samples"
        ax.set_title(f"{split}: {shown}", loc="left")
        ax.set_ylabel("samples")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlim(0, edges[-1])
        ax.legend(loc="best")
    if splits:
        axes[len(splits) - 1].set_xlabel("tokens per sample (untruncated)")

    # What if: the cost of each candidate limit, the decision marked.
    ax = axes[-1]
    rows = sorted(what_if_rows, key=lambda row: row["max_seq_length"])
    limits = [row["max_seq_length"] for row in rows]
    curves = [("samples_cut_share", "samples cut", "o"), ("tokens_cut_share", "tokens cut", "s")]
    if rows and all("response_tokens_cut_share" in row for row in rows):
        curves.append(("response_tokens_cut_share", "response tokens cut", "^"))
    for key, label, marker in curves:
        ax.plot(limits, [row[key] for row in rows], marker=marker, markersize=4, label=label)
    ax.axvline(max_seq_length, color=DECISION_COLOR, linestyle="--", label=decision)
    chosen = next((row for row in rows if row["max_seq_length"] == max_seq_length), None)
    if chosen is not None:
        ax.annotate(
            f"{max_seq_length}: {chosen['samples_cut_share']:.1%} of samples cut",
            (max_seq_length, chosen["samples_cut_share"]),
            xytext=(6, 12),
            textcoords="offset points",
            color=DECISION_COLOR,
        )
    if limits and min(limits) > 0:
        ax.set_xscale("log", base=2)  # candidates are powers of two, labelled as plain numbers
        powers = [limit for limit in limits if limit & (limit - 1) == 0]
        ax.set_xticks(powers, [str(limit) for limit in powers])
        ax.minorticks_off()
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1))
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("what if max_seq_length were ... (all splits)", loc="left")
    ax.set_xlabel("max_seq_length")
    ax.set_ylabel("share cut")
    ax.legend(loc="best")
    return figure


def write_length_picture(
    path: str | os.PathLike,
    lengths_by_split: Mapping[str, Sequence[int]],
    max_seq_length: int,
    block_size: int,
    what_if_rows: Sequence[Mapping],
) -> str | None:
    """Writes ``length_figure`` as a PNG at ``path`` and returns None; without matplotlib writes nothing and returns
    the one-line hint (``PLOT_HINT``). The file appears whole or not at all (written aside, then renamed)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return PLOT_HINT
    path = Path(path)
    figure = length_figure(lengths_by_split, max_seq_length, block_size, what_if_rows)
    temporary = path.with_name(f".tmp-{path.name}")
    figure.savefig(temporary, format="png", dpi=100)
    os.replace(temporary, path)
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
