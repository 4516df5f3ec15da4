"""The length decision and the report, on plain lists."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

import data_utils
from data_utils import LengthError, decide_max_seq_length
from litgpt_seqlen.report import build, printed

lengths_lists = st.lists(st.integers(min_value=1, max_value=5000), min_size=1, max_size=40)
splits = st.fixed_dictionaries({"train": lengths_lists, "val": lengths_lists})
headrooms = st.floats(min_value=0, max_value=3, allow_nan=False)
block_sizes = st.integers(min_value=1, max_value=8192)


@given(splits, block_sizes, headrooms)
def test_never_below_longest_unless_capped(lengths, block_size, headroom):
    decision = decide_max_seq_length(lengths, block_size, headroom)
    longest = max(max(lengths["train"]), max(lengths["val"]))
    assert decision.longest == longest
    if decision.capped:
        assert decision.max_seq_length == block_size and block_size < longest * (1 + headroom) + 1e-6
    else:
        assert decision.max_seq_length >= longest


@given(splits, block_sizes, headrooms, st.none() | st.integers(min_value=1, max_value=20000))
def test_never_above_block_size(lengths, block_size, headroom, override):
    assert decide_max_seq_length(lengths, block_size, headroom, override).max_seq_length <= block_size


@given(splits)
def test_headroom_zero_gives_exactly_the_longest(lengths):
    longest = max(n for split in lengths.values() for n in split)
    decision = decide_max_seq_length(lengths, block_size=10_000, headroom=0)
    assert decision.max_seq_length == longest and not decision.capped


@given(splits, st.integers(min_value=1, max_value=20000), block_sizes)
def test_override_wins_and_is_capped(lengths, override, block_size):
    decision = decide_max_seq_length(lengths, block_size, 0.1, override)
    assert decision.source == "override"
    assert decision.max_seq_length == min(override, block_size)
    assert decision.capped == (override > block_size)


def test_the_reported_case():
    decision = decide_max_seq_length({"train": [100, 466], "val": [473, 12]}, block_size=2048, headroom=0.1)
    assert (decision.max_seq_length, decision.longest_split, decision.source) == (521, "val", "auto")
    assert decision.summary() == "max_seq_length = 521 (longest 473 in val, +10% headroom; block_size 2048)"


def test_headroom_has_no_float_error():
    # 100 * 1.1 is 110.00000000000001 in floats; the decision must still say 110.
    assert decide_max_seq_length({"train": [100]}, 4096, 0.1).max_seq_length == 110
    assert decide_max_seq_length({"train": [1000]}, 4096, 0.07).max_seq_length == 1070


def test_cap_at_block_size():
    decision = decide_max_seq_length({"train": [528], "val": [10]}, block_size=512, headroom=0.1)
    assert (decision.max_seq_length, decision.wanted, decision.capped) == (512, 581, True)
    assert "capped at block_size 512" in decision.summary()


@pytest.mark.parametrize(
    "headroom, override, policy",
    [
        (-0.1, None, "truncate"),
        (float("nan"), None, "truncate"),
        (0.1, 0, "truncate"),
        (0.1, -5, "truncate"),
        (0.1, None, "cut"),
    ],
)
def test_bad_settings_are_refused(headroom, override, policy):
    with pytest.raises(LengthError):
        data_utils.check_settings(headroom, override, policy)


def test_bad_truncate_from_is_refused():
    data_utils.check_settings(0.1, None, "truncate", "end")
    with pytest.raises(LengthError, match="--seq.truncate_from must be one of prompt, end, got 'start'"):
        data_utils.check_settings(0.1, None, "truncate", "start")


def test_split_stats_hand_checked():
    stats = data_utils.split_stats([5, 1, 9, 3, 9, 2, 7, 4, 6, 8], limit=6)
    assert stats == {
        "count": 10,
        "min": 1,
        "mean": 5.4,
        "p50": 5,
        "p90": 9,
        "p99": 9,
        "max": 9,
        "argmax": 2,
        "over_limit": 4,  # 9, 9, 7, 8
        "tokens_truncated": 3 + 3 + 1 + 2,
    }


def test_what_if_hand_checked():
    # 10 samples, 2000 tokens in all; block_size 512 gives candidates 128, 256, 512 plus p90/p95/p99/max.
    lengths = [100] * 5 + [200] * 3 + [300, 600]
    rows = {row["max_seq_length"]: row for row in data_utils.what_if(lengths, block_size=512, chosen=330)}
    assert sorted(rows) == [128, 256, 300, 330, 512, 600]
    assert rows[300]["label"] == "p90" and rows[600]["label"] == "p95/p99/max" and rows[330]["label"] == "chosen"
    # at 128: the three 200s lose 72 each, 300 loses 172, 600 loses 472
    assert rows[128]["samples_cut"] == 5 and rows[128]["tokens_cut"] == 3 * 72 + 172 + 472
    assert rows[128]["samples_cut_share"] == 0.5 and rows[128]["tokens_cut_share"] == 860 / 2000
    assert (rows[256]["samples_cut"], rows[256]["tokens_cut"]) == (2, 44 + 344)
    assert (rows[512]["samples_cut"], rows[512]["tokens_cut"]) == (1, 88)
    assert (rows[600]["samples_cut"], rows[600]["tokens_cut"]) == (0, 0)


def test_over_length_error_names_samples_and_flags():
    decision = decide_max_seq_length({"train": [10]}, block_size=100, override=50)
    message = data_utils.over_length_error({"train": [10, 70, 20], "val": [60, 5]}, decision)
    assert "train[1] = 70" in message and "val[0] = 60" in message
    for flag in ("--train.max_seq_length", "--seq.over_length truncate", "--seq.over_length drop"):
        assert flag in message
    assert data_utils.over_length_error({"train": [10, 50]}, decision) is None


@given(st.lists(st.integers(min_value=1, max_value=100), min_size=1), st.integers(min_value=1, max_value=100))
def test_drop_and_error_agree_on_what_does_not_fit(lengths, limit):
    """drop keeps exactly the samples within the limit, in order; error stops exactly when drop would drop one."""
    decision = decide_max_seq_length({"train": lengths}, block_size=100, override=limit)
    try:
        kept = data_utils.apply_over_length({"train": lengths, "val": [1]}, decision, "drop")["train"]
    except LengthError:  # drop would empty train: then every sample is over the limit
        assert min(lengths) > limit
        return
    assert kept == sorted(kept) and all(lengths[i] <= limit for i in kept)
    assert all(lengths[i] > limit for i in set(range(len(lengths))) - set(kept))
    would_drop = len(kept) < len(lengths)
    try:
        data_utils.apply_over_length({"train": lengths}, decision, "error")
        stopped = False
    except LengthError:
        stopped = True
    assert stopped == would_drop
    assert data_utils.split_stats(lengths, limit)["over_limit"] == len(lengths) - len(kept)


def test_an_empty_split_has_stats_and_a_histogram():
    assert data_utils.split_stats([], 10) == {
        "count": 0,
        "min": None,
        "mean": None,
        "p50": None,
        "p90": None,
        "p99": None,
        "max": None,
        "argmax": None,
        "over_limit": 0,
        "tokens_truncated": 0,
    }
    assert "no samples" in printed.histogram([], 10, 20)


def test_write_dropped_keeps_samples_unchanged(tmp_path):
    sample = {"instruction": "héllo", "output": "x", "extra": [1, 2]}
    build.write_dropped(tmp_path / "d.jsonl", [("val", 3, 99, "unsupervised", sample)])
    assert json.loads((tmp_path / "d.jsonl").read_text(encoding="utf-8")) == {
        "split": "val",
        "index": 3,
        "length": 99,
        "reason": "unsupervised",
        "sample": sample,
    }


def test_histogram_marks_the_limits():
    text = printed.histogram([10, 20, 30, 120], max_seq_length=100, block_size=2048, bins=4)
    marked = [line for line in text.splitlines() if "max_seq_length 100" in line]
    assert len(marked) == 1 and "block_size 2048 is beyond" in text


def test_apply_over_length_policies():
    lengths = {"train": [10, 70, 20], "val": [60, 5]}
    decision = decide_max_seq_length(lengths, block_size=100, override=50)
    everything = {"train": [0, 1, 2], "val": [0, 1]}
    assert data_utils.apply_over_length(lengths, decision, "truncate") == everything
    assert data_utils.apply_over_length(lengths, decision, "drop") == {"train": [0, 2], "val": [1]}
    with pytest.raises(LengthError, match=r"train\[1\] = 70"):
        data_utils.apply_over_length(lengths, decision, "error")
    with pytest.raises(LengthError, match="leaves the val split empty"):
        data_utils.apply_over_length({"train": [10], "val": [60]}, decision, "drop")


def test_the_over_length_flag_offers_every_policy_and_each_does_one_thing():
    """The policies live in ``data_utils.OVER_LENGTH``; the command line offers exactly those."""
    import typing

    from litgpt_seqlen.args import SeqArgs

    assert typing.get_args(typing.get_type_hints(SeqArgs)["over_length"]) == data_utils.OVER_LENGTH_POLICIES
    for policy in data_utils.OVER_LENGTH.values():
        assert [policy.cuts, policy.leaves_out, policy.stops].count(True) == 1, policy
    lengths, decision = {"train": [5, 12], "val": [4]}, data_utils.decide_max_seq_length({"train": [5], "val": [4]}, 10)
    assert data_utils.apply_over_length(lengths, decision, "truncate") == {"train": [0, 1], "val": [0]}
    assert data_utils.apply_over_length(lengths, decision, "drop") == {"train": [0], "val": [0]}
    with pytest.raises(data_utils.LengthError, match="train"):
        data_utils.apply_over_length(lengths, decision, "error")
