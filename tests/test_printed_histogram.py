"""The histogram the run prints per split: it must show the tail (a few samples far longer than the rest) in a dozen
lines, count every sample once, and mark max_seq_length and block_size where they fall."""

import itertools
import re

from hypothesis import given
from hypothesis import strategies as st

from helpers import OUTLIERS, long_tailed_lengths
from litgpt_seqlen.report import printed

ROW = re.compile(r"^\s+(\d+)(?:-(\d+))?\s+#*\s+(\d+)(.*)$")


def printed_rows(text: str) -> list[tuple[int, int, int, str]]:
    """(lowest length, highest length, count, the rest of the line) of each bin line of a printed histogram."""
    rows = []
    for line in text.splitlines():
        match = ROW.match(line)
        if match:
            low, high, count, rest = match.groups()
            rows.append((int(low), int(high or low), int(count), rest))
    return rows


def test_the_printed_histogram_names_the_outliers_and_splits_the_bulk():
    train = long_tailed_lengths()["train"]

    text = printed.histogram(train, max_seq_length=3355, block_size=4096, split="train")

    assert len(text.splitlines()) <= 12
    rows = printed_rows(text)
    assert sum(count for _, _, count, _ in rows) == len(train)
    for length in OUTLIERS:  # each on a line of its own, with the sample that has it
        (row,) = [row for row in rows if row[0] <= length <= row[1]]
        assert row[2] == 1 and f"train[{train.index(length)}]" in row[3]
    bulk = [row for row in rows if row[1] < 300 and row[2]]
    assert len(bulk) >= 3 and sum(count for _, _, count, _ in bulk) == len(train) - len(OUTLIERS)
    assert "max_seq_length 3355 and block_size 4096 are beyond the longest sample" in text


def test_a_limit_inside_the_tail_is_marked_between_the_samples_it_keeps_and_those_it_cuts():
    train = long_tailed_lengths()["train"]

    lines = printed.histogram(train, max_seq_length=1024, block_size=4096, split="train").splitlines()

    (mark,) = [i for i, line in enumerate(lines) if "max_seq_length 1024" in line]
    below = [length for line in lines[:mark] for length, *_ in printed_rows(line)]
    above = [length for line in lines[mark + 1 :] for length, *_ in printed_rows(line)]
    assert max(below) == 950 and min(above) == 1500


@given(
    st.lists(st.integers(1, 50_000), min_size=1, max_size=300),
    st.integers(1, 60_000),
    st.integers(0, 60_000),
)
def test_the_printed_histogram_counts_every_sample_once_in_a_dozen_lines(lengths, max_seq_length, extra):
    block_size = max_seq_length + extra

    text = printed.histogram(lengths, max_seq_length, block_size)

    assert len(text.splitlines()) <= 12
    rows = printed_rows(text)
    assert [count for _, _, count, _ in rows] == [sum(low <= n <= high for n in lengths) for low, high, _, _ in rows]
    assert sum(count for _, _, count, _ in rows) == len(lengths)
    assert all(a[1] < b[0] for a, b in itertools.pairwise(rows))  # in order, no length in two lines
    assert sum("max_seq_length" in line for line in text.splitlines()) == 1
    assert sum("block_size" in line for line in text.splitlines()) == 1
