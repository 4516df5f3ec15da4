"""The length picture, ``seq_lengths.png``: one histogram per split and a what-if panel, the decision marked. A length
picture exists to show the tail, so it is checked on a long-tailed set too. Checked from the figure's objects (axes,
scales, line positions, bar heights, text extents), never from pixels."""

import functools
import itertools
import random
import re
import struct
import sys

import pytest

import data_utils
from helpers import OUTLIERS, long_tailed_lengths
from litgpt_seqlen.report import picture

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def realistic_lengths(seed: int = 0) -> dict[str, list[int]]:
    """Instruction data as it comes: most samples a few hundred tokens, a long tail, one outlier in val."""
    rng = random.Random(seed)
    train = [int(rng.lognormvariate(5.3, 0.45)) + 20 for _ in range(400)]
    val = [int(rng.lognormvariate(5.3, 0.45)) + 20 for _ in range(40)] + [1400]
    return {"train": train, "val": val}


def rows_for(lengths: dict[str, list[int]], decision: data_utils.Decision) -> list[dict]:
    every = [n for split in lengths.values() for n in split]
    rows = data_utils.what_if(every, decision.block_size, chosen=decision.max_seq_length)
    # The response share as truncation.add_response_cut adds it; any share in [0, 1] serves the picture.
    return [{**row, "response_tokens_cut_share": min(1.0, row["tokens_cut_share"] * 1.2)} for row in rows]


def lines_labelled(ax, label: str) -> list:
    return [line for line in ax.get_lines() if line.get_label() == label]


def bar_total(ax) -> float:
    return sum(patch.get_height() for patch in ax.patches)


def test_one_histogram_per_split_and_the_what_if_panel_with_the_decision_marked():
    pytest.importorskip("matplotlib", reason="the picture tests need matplotlib: pip install '.[plot]'")
    lengths = realistic_lengths()
    decision = data_utils.decide_max_seq_length(lengths, block_size=2048, headroom=0.1)
    assert decision.max_seq_length == 1540  # 1400 + 10%
    rows = rows_for(lengths, decision)

    figure = picture.length_figure(lengths, decision.max_seq_length, decision.block_size, rows)

    axes = figure.get_axes()
    assert len(axes) == len(lengths) + 1
    marker = f"max_seq_length {decision.max_seq_length}"
    for ax, (split, split_lengths) in zip(axes, lengths.items()):
        assert ax.get_title(loc="left").startswith(f"{split}: {len(split_lengths)} samples")
        assert bar_total(ax) == len(split_lengths)
        (line,) = lines_labelled(ax, marker)
        assert list(line.get_xdata()) == [decision.max_seq_length] * 2
        assert not lines_labelled(ax, "block_size 2048")  # far beyond the data: not drawn
    what_if = axes[-1]
    assert not what_if.patches
    (decision_line,) = lines_labelled(what_if, marker)
    assert list(decision_line.get_xdata()) == [decision.max_seq_length] * 2
    for key, label in (
        ("samples_cut_share", "samples cut"),
        ("tokens_cut_share", "tokens cut"),
        ("response_tokens_cut_share", "response tokens cut"),
    ):
        (curve,) = lines_labelled(what_if, label)
        assert list(curve.get_xdata()) == [row["max_seq_length"] for row in rows]
        assert list(curve.get_ydata()) == pytest.approx([row[key] for row in rows])
    # Read back from the curve: the decided limit cuts nothing, 128 cuts most samples.
    (samples,) = lines_labelled(what_if, "samples cut")
    samples_cut = dict(zip(samples.get_xdata(), samples.get_ydata()))
    assert samples_cut[decision.max_seq_length] == 0.0 and samples_cut[128] > 0.8


def test_a_capped_decision_marks_block_size_and_an_empty_split_gets_its_panel():
    pytest.importorskip("matplotlib", reason="the picture tests need matplotlib: pip install '.[plot]'")
    lengths = {"train": [300, 500, 900, 1200], "val": [400, 700], "test": []}
    decision = data_utils.decide_max_seq_length(lengths, block_size=1024, headroom=0.1)
    assert decision.capped and decision.max_seq_length == 1024
    rows = data_utils.what_if([n for split in lengths.values() for n in split], 1024, chosen=1024)  # no response share

    figure = picture.length_figure(lengths, decision.max_seq_length, decision.block_size, rows)

    axes = figure.get_axes()
    assert len(axes) == 4
    for ax, split_lengths in zip(axes, lengths.values()):
        assert bar_total(ax) == len(split_lengths)
        (block,) = lines_labelled(ax, "block_size 1024")
        assert list(block.get_xdata()) == [1024, 1024]
    assert axes[2].get_title(loc="left") == "test: no samples"
    assert [line.get_label() for line in axes[-1].get_lines()] == ["samples cut", "tokens cut", "max_seq_length 1024"]


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the PNG's first chunk, which must be IHDR."""
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


@pytest.mark.e2e
def test_write_length_picture_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="the picture tests need matplotlib: pip install '.[plot]'")
    lengths = realistic_lengths()
    decision = data_utils.decide_max_seq_length(lengths, block_size=2048, headroom=0.1)
    path = tmp_path / "seq_lengths.png"

    assert (
        picture.write_length_picture(path, lengths, decision.max_seq_length, 2048, rows_for(lengths, decision)) is None
    )

    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    width, height = png_size(data)
    assert width > 0 and height > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seq_lengths.png"]  # nothing left aside


def test_without_matplotlib_nothing_is_written_and_the_hint_says_how(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    path = tmp_path / "seq_lengths.dry_run.png"

    hint = picture.write_length_picture(path, {"train": [10, 20], "val": [15]}, 22, 64, [])

    assert "pip install matplotlib" in hint  # works from a clone as from an installed package
    assert hint.endswith("to get seq_lengths.dry_run.png")  # the file this run would have written
    assert "\n" not in hint
    assert not any(tmp_path.iterdir())


def test_the_lengths_go_to_a_logger_that_draws_histograms(tiny_checkpoint, make_data, tmp_path):
    """A logger with TensorBoard's ``add_histogram`` gets one histogram per split, of exactly the scanned lengths."""
    import lightning as L
    from lightning.fabric.loggers import Logger
    from litgpt.args import TrainArgs
    from litgpt.data import JSON
    from litgpt.tokenizer import Tokenizer

    from litgpt_seqlen.args import SeqArgs
    from litgpt_seqlen.data.length_plan import plan_lengths
    from litgpt_seqlen.report.build import publish_plan

    class Drawn:
        def __init__(self):
            self.histograms = {}

        def add_histogram(self, tag, values, step):
            self.histograms[tag] = (sorted(values.tolist()), step)

    class Histograms(Logger):
        name, version, experiment = "h", 0, Drawn()

        def log_metrics(self, metrics, step=None):
            pass

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    logger = Histograms()
    fabric = L.Fabric(accelerator="cpu", devices=1, loggers=logger)
    data = JSON(json_path=make_data([100, 120, 90], [110, 95]), num_workers=0)
    plan = plan_lengths(fabric, data, Tokenizer(tiny_checkpoint), TrainArgs(), SeqArgs(), 512)
    publish_plan(fabric, tmp_path / "out", plan, SeqArgs(), TrainArgs(micro_batch_size=1, global_batch_size=1), seed=0)
    assert logger.experiment.histograms == {
        "seq/train_lengths": ([90, 100, 120], 0),
        "seq/val_lengths": ([95, 110], 0),
    }


def test_a_run_draws_its_own_report(cli_here, make_data, tmp_path):
    """A dry run writes seq_lengths.png beside seq_lengths.json; the figure built from that report's decision and
    what-if rows has one panel per split, the decision marked where the report says."""
    import json

    out = tmp_path / "out"
    train, val = [100, 120, 90, 300], [110, 95]
    run = cli_here(make_data(train, val), out, "--seq.dry_run", "true")
    assert run.returncode == 0, run.stderr
    assert (out / "seq_lengths.png").read_bytes()[:8] == PNG_SIGNATURE
    report = json.loads((out / "seq_lengths.json").read_text())
    figure = picture.length_figure(
        {"train": train, "val": val}, report["max_seq_length"], report["block_size"], report["what_if"]
    )
    histograms = figure.axes[:2]
    assert len(figure.axes) == 3
    for axes, lengths in zip(histograms, (train, val)):
        assert sum(patch.get_height() for patch in axes.patches) == len(lengths)
        assert report["max_seq_length"] in [line.get_xdata()[0] for line in axes.get_lines()]


@functools.cache  # drawn once per block_size: the tests below only read the figure
def long_tailed_figure(block_size: int):
    lengths = long_tailed_lengths()
    decision = data_utils.decide_max_seq_length(lengths, block_size=block_size, headroom=0.1)
    figure = picture.length_figure(lengths, decision.max_seq_length, block_size, rows_for(lengths, decision))
    figure.canvas.draw()  # runs the layout
    return lengths, decision, figure


def drawn_tick_labels(axis) -> list:
    """The tick labels drawn on an axis: visible, not empty, at a tick inside the view."""
    low, high = sorted(axis.get_view_interval())
    ticks = zip(axis.get_major_ticks(len(axis.get_majorticklocs())), axis.get_majorticklocs())
    return [
        label
        for tick, location in ticks
        if low <= location <= high
        for label in (tick.label1, tick.label2)
        if label.get_visible() and label.get_text().strip()
    ]


def labelled_axes(figure) -> list:
    """Every axis drawn with ticks: both of each panel's, and the one of each secondary axis."""
    return [axis for ax in figure.axes for axis in (ax.xaxis, ax.yaxis, *(child.xaxis for child in ax.child_axes))]


def test_the_long_tail_is_visible_each_outlier_marked_and_the_quantiles_named():
    pytest.importorskip("matplotlib")
    lengths, _, figure = long_tailed_figure(block_size=4096)

    train = figure.axes[0]
    assert train.get_yscale() == "log" and train.get_ylim()[0] < 1  # a bin of one sample has a bar of its own
    for length in OUTLIERS:
        (bar,) = [bar for bar in train.patches if bar.get_x() <= length < bar.get_x() + bar.get_width()]
        assert bar.get_height() == 1
        assert str(length) in train.get_title(loc="left")
    markers = [line for line in train.get_lines() if line.get_linestyle() == "None"]
    assert sorted(x for line in markers for x in line.get_xdata()) == list(OUTLIERS)
    stats = data_utils.split_stats(lengths["train"], 4096)
    quantiles = " ".join(label.get_text() for label in drawn_tick_labels(train.child_axes[0].xaxis))
    for name in ("p50", "p90", "p99", "max"):
        assert re.search(rf"{name}\b[/a-z0-9]* {stats[name]}\b", quantiles), (name, quantiles)
    assert not re.search(r"\d", figure.axes[1].get_title(loc="left").partition("\n")[2])  # val: no tail listed


LIMITS = pytest.mark.parametrize("block_size", [4096, 3500, 3072], ids=["block_size_beyond", "close", "equal"])


@LIMITS
def test_every_axis_of_the_long_tailed_picture_has_tick_labels_and_none_collide(block_size):
    pytest.importorskip("matplotlib")
    _, _, figure = long_tailed_figure(block_size)
    renderer = figure.canvas.get_renderer()

    for axis in labelled_axes(figure):
        labels = drawn_tick_labels(axis)
        assert labels, f"an axis of {axis.axes.get_title(loc='left')!r} has no tick label"
        boxes = [label.get_window_extent(renderer) for label in labels]
        assert not any(a.overlaps(b) for a, b in itertools.combinations(boxes, 2)), [x.get_text() for x in labels]
    (curve, *_) = figure.axes[-1].get_lines()
    what_if = [label.get_text() for label in drawn_tick_labels(figure.axes[-1].xaxis)]
    assert str(max(curve.get_xdata())) in what_if  # the curve's last candidate is named


@LIMITS
def test_every_text_of_the_long_tailed_picture_lies_inside_the_figure(block_size):
    pytest.importorskip("matplotlib")
    from matplotlib.text import Text

    _, _, figure = long_tailed_figure(block_size)
    renderer = figure.canvas.get_renderer()

    axes = labelled_axes(figure)
    tick_labels = {
        id(label) for axis in axes for tick in axis.get_major_ticks() for label in (tick.label1, tick.label2)
    }
    drawn = {id(label) for axis in axes for label in drawn_tick_labels(axis)}
    texts = [text for text in figure.findobj(Text) if text.get_visible() and text.get_text().strip()]
    page = figure.bbox.padded(1)
    for text in texts:
        if id(text) not in tick_labels or id(text) in drawn:
            box = text.get_window_extent(renderer)
            assert page.contains(box.x0, box.y0) and page.contains(box.x1, box.y1), text.get_text()


@LIMITS
def test_the_legend_of_the_long_tailed_picture_hides_no_bar_marker_or_point(block_size):
    pytest.importorskip("matplotlib")
    _, _, figure = long_tailed_figure(block_size)
    renderer = figure.canvas.get_renderer()

    legends = [*figure.legends, *(ax.get_legend() for ax in figure.axes if ax.get_legend())]
    bars = [bar.get_window_extent(renderer) for ax in figure.axes for bar in ax.patches if bar.get_height() > 0]
    points = [
        xy for ax in figure.axes for line in ax.get_lines() for xy in line.get_transform().transform(line.get_xydata())
    ]
    assert legends and bars and points
    for legend in legends:
        box = legend.get_window_extent(renderer)
        assert not any(box.overlaps(bar) for bar in bars)
        assert not any(box.contains(x, y) for x, y in points)


@pytest.mark.parametrize("block_size", [3500, 3072], ids=["close", "equal"])
def test_max_seq_length_and_block_size_are_drawn_apart_and_each_labelled(block_size):
    pytest.importorskip("matplotlib")
    _, decision, figure = long_tailed_figure(block_size)
    renderer = figure.canvas.get_renderer()

    for ax in figure.axes[:2]:
        (decided,) = lines_labelled(ax, f"max_seq_length {decision.max_seq_length}")
        (block,) = lines_labelled(ax, f"block_size {block_size}")
        assert (decided.get_color(), decided.get_linestyle()) != (block.get_color(), block.get_linestyle())
        for line, name, value in (
            (decided, "max_seq_length", decision.max_seq_length),
            (block, "block_size", block_size),
        ):
            x = line.get_transform().transform((line.get_xdata()[0], 0))[0]
            named = [text for text in ax.texts if name in text.get_text() and str(value) in text.get_text()]
            boxes = [text.get_window_extent(renderer) for text in named]
            assert any(min(abs(box.x0 - x), abs(box.x1 - x)) < 10 for box in boxes), name  # beside its line
        labels = [text.get_window_extent(renderer) for text in ax.texts]
        assert not any(a.overlaps(b) for a, b in itertools.combinations(labels, 2))
