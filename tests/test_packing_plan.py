"""The packing plan (which samples share a row, which rows make a micro-batch, which rank takes it), its measure,
and a DataLoader built on it."""

import json
import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from litgpt.utils import CycleIterator
from torch.utils.data import DataLoader

from helpers import SHARED, requires_shared
from litgpt_seqlen.data import scan
from litgpt_seqlen.data.order import ResumableBatchSampler, expected_efficiency
from litgpt_seqlen.data.packing import (
    PackedRows,
    all_ranks_batches,
    best_fit_decreasing,
    fullest_rows,
    pack_rows,
    packed_batches,
    packed_collate,
    packed_plan,
    packing_efficiency,
    plan_report,
)

plans = {
    "lengths": st.lists(st.integers(1, 600), min_size=1, max_size=300),
    "max_seq_length": st.integers(1, 700),
    "micro_batch_size": st.integers(1, 8),
    "seed": st.integers(0, 2**32),
    "epoch": st.integers(0, 50),
    "group_size": st.integers(1, 400),
}


def rows_of(batches):
    return [row for batch in batches for row in batch]


def tokens(row, lengths, limit):
    return sum(min(lengths[i], limit) for i in row)


@settings(max_examples=150, deadline=None)
@given(**plans)
def test_every_sample_once_in_rows_that_fit(lengths, max_seq_length, micro_batch_size, seed, epoch, group_size):
    rows = pack_rows(lengths, max_seq_length, seed, epoch, group_size)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(row and tokens(row, lengths, max_seq_length) <= max_seq_length for row in rows)
    batches = packed_batches(lengths, max_seq_length, micro_batch_size, seed, epoch, group_size=group_size)
    filled = math.ceil(len(rows) / micro_batch_size) * micro_batch_size  # the last micro-batch filled from the start
    assert rows_of(batches) == (rows * micro_batch_size)[:filled]
    assert all(len(batch) == micro_batch_size for batch in batches)
    assert batches == packed_batches(lengths, max_seq_length, micro_batch_size, seed, epoch, group_size=group_size)


@pytest.mark.e2e
@settings(max_examples=150, deadline=None)
@given(lengths=plans["lengths"], max_seq_length=plans["max_seq_length"])
def test_no_two_rows_of_a_group_could_be_merged(lengths, max_seq_length):
    """Best fit opens a row only for a sample that fits in no open row, and rows only fill up: so any two rows of
    one group hold more than max_seq_length together (fewer than twice the lower bound of rows)."""
    rows = best_fit_decreasing(range(len(lengths)), lengths, max_seq_length)
    fills = sorted(tokens(row, lengths, max_seq_length) for row in rows)
    assert len(fills) == 1 or fills[0] + fills[1] > max_seq_length
    assert len(rows) < 2 * math.ceil(sum(fills) / max_seq_length) + 1


@settings(max_examples=100, deadline=None)
@given(**plans, world_size=st.integers(1, 5), accumulation=st.integers(1, 3))
def test_ranks_take_equal_shares_of_one_packing_in_whole_steps(
    lengths, max_seq_length, micro_batch_size, seed, epoch, group_size, world_size, accumulation
):
    rows = [tuple(row) for row in pack_rows(lengths, max_seq_length, seed, epoch, group_size)]
    step_size = micro_batch_size * accumulation
    sizes = {"group_size": group_size, "step_size": step_size}
    shares = [
        packed_batches(lengths, max_seq_length, micro_batch_size, seed, epoch, r, world_size, **sizes)
        for r in range(world_size)
    ]
    steps = math.ceil(len(rows) / (step_size * world_size))
    assert {len(share) for share in shares} == {steps * accumulation}  # every rank as many steps, all whole
    taken = Counter(tuple(row) for share in shares for batch in share for row in batch)
    assert set(taken) == set(rows)  # every row of the one packing, on some rank
    repeats = taken.total() - len(rows)
    assert repeats == steps * step_size * world_size - len(rows)  # only to fill the last step
    before_last = Counter(tuple(row) for share in shares for batch in share[:-accumulation] for row in batch)
    assert set(before_last.values()) <= {1}
    everyone = all_ranks_batches(lengths, max_seq_length, micro_batch_size, seed, epoch, world_size, **sizes)
    assert [everyone[r::world_size] for r in range(world_size)] == shares


def test_seeds_and_epochs_pack_differently():
    lengths = [(i * 37) % 300 + 20 for i in range(400)]
    first = pack_rows(lengths, 512, seed=1, epoch=0, group_size=100)
    assert first == pack_rows(lengths, 512, seed=1, epoch=0, group_size=100)
    assert first != pack_rows(lengths, 512, seed=1, epoch=1, group_size=100)
    assert first != pack_rows(lengths, 512, seed=2, epoch=0, group_size=100)
    # which samples share a row changes too, not only the order of the rows
    assert {frozenset(r) for r in first} != {
        frozenset(r) for r in pack_rows(lengths, 512, seed=1, epoch=1, group_size=100)
    }


def test_efficiency_hand_computed():
    lengths = [5, 3, 4, 2, 9, 1]
    batches = [[[0, 1], [2]], [[4, 5]]]  # rows of 8 and 4 tokens padded to 8; one row of 10 (9 + 1)
    measured = packing_efficiency(batches, lengths, max_seq_length=10)
    assert measured == {
        "count": 2,
        "rows": 3,
        "samples": 5,
        "samples_per_row": round(5 / 3, 3),
        "real_tokens": 22,
        "padded_tokens": 26,
        "efficiency": 22 / 26,
    }


def test_loader_of_packed_rows():
    """A DataLoader over ``PackedRows`` with the sampler and the collate: each epoch, every sample once, the
    sampler's plan in order; a new packing in the next epoch, as CycleIterator runs it."""
    lengths = [3, 7, 2, 5, 6, 1, 4, 4, 8, 2]
    dataset = [
        {
            "input_ids": torch.full((n,), i),
            "labels": torch.full((n,), i),
            "token_counts": {"raw": n, "raw_plus_prompt_template": n},
        }
        for i, n in enumerate(lengths)
    ]
    sampler = ResumableBatchSampler(packed_plan(lengths, max_seq_length=10, micro_batch_size=2, seed=3))
    loader = DataLoader(PackedRows(dataset), batch_sampler=sampler, collate_fn=packed_collate)
    plans = [packed_batches(lengths, 10, 2, seed=3, epoch=e) for e in range(2)]
    assert len(loader) == len(plans[0])
    batches = CycleIterator(loader)
    for plan in plans:
        for rows in plan:
            batch = next(batches)
            for r, row in enumerate(rows):
                real = sum(lengths[i] for i in row)
                assert batch["segment_lengths"][r] == [lengths[i] for i in row]
                assert batch["input_ids"][r][:real].tolist() == [i for i in row for _ in range(lengths[i])]
    assert plans[0] != plans[1]


@requires_shared("the packing tests on the real Alpaca data")
@pytest.mark.parametrize("name", ["alpaca_en_demo", "alpaca_zh_demo"])
def test_alpaca_packs_to_at_least_98_percent(name):
    """The target on real data: Llama 2 SentencePiece, Alpaca prompt style, micro_batch_size 4 and
    max_seq_length = longest + 10%: at least 98% of the processed tokens are real (each micro-batch padded to its
    longest row)."""
    from litgpt.data import SFTDataset
    from litgpt.prompts import Alpaca
    from litgpt.tokenizer import Tokenizer

    samples = json.loads((SHARED / "data" / f"{name}.json").read_text())
    dataset = SFTDataset(samples, Tokenizer(SHARED / "tokenizers" / "llama2-sentencepiece"), prompt_style=Alpaca())
    lengths = [parts.length for parts in scan.scan_parts(dataset, "train")]
    limit = math.ceil(max(lengths) * 1.1)
    estimates = expected_efficiency(lengths, limit, micro_batch_size=4, seed=42)
    assert estimates["packed"]["efficiency"] >= 0.98
    # every sample, and those repeated to fill the epoch's last micro-batch
    assert estimates["packed"]["real_tokens"] >= sum(lengths) and estimates["random"]["real_tokens"] >= sum(lengths)
    assert estimates["random"]["efficiency"] < estimates["packed"]["efficiency"]


def test_fullest_rows_and_the_report():
    lengths = [9, 1, 5, 5, 3, 7, 2, 8]  # best fit at 10: [9, 1], [8, 2], [7, 3], [5, 5]: all full
    rows = fullest_rows(lengths + [4], max_seq_length=10, micro_batch_size=2)
    assert [sum(lengths[i] for i in row) for row in rows] == [10, 10]
    sampler = ResumableBatchSampler(
        packed_plan(lengths + [4], max_seq_length=10, micro_batch_size=2, seed=0, world_size=2)
    )
    report = plan_report(lengths + [4], 10, 2, seed=0, world_size=2)  # 5 rows -> 3 micro-batches -> one repeated
    assert (report["count"], report["packed"], report["micro_batch_size"]) == (4, True, 2)
    assert report["rows"] >= 5 and report["samples"] > len(lengths)
    assert len(sampler) == 2 and list(sampler) == sampler.batches(0) and sampler.epoch == 1
