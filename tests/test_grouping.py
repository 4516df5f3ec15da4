"""--seq.group_by_length: the grouping function, its padding measure, the batch sampler and the CLI end to end."""

import csv
import math
import random
from collections import Counter
from functools import partial
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from data_utils import grouped_batches, padding_efficiency
from helpers import read_report
from litgpt_seqlen.data.order import ResumableBatchSampler, expected_efficiency

lengths_strategy = st.lists(st.integers(1, 2000), min_size=1, max_size=300)
settings_strategy = dict(
    lengths=lengths_strategy,
    micro_batch_size=st.integers(1, 16),
    megabatch_size=st.integers(1, 60),
    seed=st.integers(0, 2**32),
    epoch=st.integers(0, 100),
)


def flat(batches):
    return [i for batch in batches for i in batch]


def spread_out(n, seed, low, high):
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(n)]


def random_batches(n, micro_batch_size, seed):
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return [order[i : i + micro_batch_size] for i in range(0, n, micro_batch_size)]


# --- grouped_batches ----------------------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(**settings_strategy)
def test_every_sample_once_but_what_fills_the_last_micro_batch(lengths, micro_batch_size, megabatch_size, seed, epoch):
    batches = grouped_batches(lengths, micro_batch_size, seed, epoch, megabatch_size)
    seen = Counter(flat(batches))
    assert set(seen) == set(range(len(lengths)))
    assert len(batches) == math.ceil(len(lengths) / micro_batch_size)
    assert all(len(b) == micro_batch_size for b in batches)  # a step is one micro-batch: the last one is filled
    assert seen.total() - len(lengths) == -len(lengths) % micro_batch_size
    assert set(Counter(flat(batches[:-1])).values()) <= {1}  # only the epoch's last one repeats samples
    for b in batches:  # longest first within a micro-batch
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    assert batches == grouped_batches(lengths, micro_batch_size, seed, epoch, megabatch_size)  # deterministic


@settings(max_examples=100, deadline=None)
@given(
    lengths=st.integers(1, 150).flatmap(lambda n: st.lists(st.integers(1, 2000), min_size=n, max_size=n)),
    micro_batch_size=st.integers(1, 4),
    megabatch_size=st.integers(1, 6),  # small: several megabatches in an epoch
    seed=st.integers(0, 2**32),
    epoch=st.integers(0, 100),
    accumulation=st.integers(1, 4),
    world_size=st.integers(1, 4),
)
def test_steps_are_the_same_for_every_micro_batch_size_that_divides_them(
    lengths, micro_batch_size, megabatch_size, seed, epoch, accumulation, world_size
):
    """Megabatches, sorting, the shuffle and the filled last step all work on steps: shrinking the micro-batches
    leaves every rank's steps (as multisets of samples) as they were."""
    step_size = micro_batch_size * accumulation
    for rank in range(world_size):
        steps = {}
        for size in (m for m in range(1, step_size + 1) if step_size % m == 0):
            batches = grouped_batches(lengths, size, seed, epoch, megabatch_size, rank, world_size, step_size)
            per_step = step_size // size
            steps[size] = [Counter(flat(batches[j : j + per_step])) for j in range(0, len(batches), per_step)]
        assert all(value == steps[step_size] for value in steps.values())
        assert len(steps[1]) == math.ceil(len(lengths) / (step_size * world_size))


@settings(max_examples=100, deadline=None)
@given(
    lengths=lengths_strategy,
    micro_batch_size=st.integers(1, 16),
    seed=st.integers(0, 2**32),
    shuffle_seed=st.integers(0, 2**32),
)
def test_one_megabatch_sorts_everything_and_never_pads_more_than_random(lengths, micro_batch_size, seed, shuffle_seed):
    """With one megabatch the micro-batches are consecutive runs of the sorted lengths: their length ranges do not
    overlap, and, when every micro-batch is full, no batching into micro-batches of that size pads less. (With a short
    last micro-batch that can fail: [1, 2, 1] by 2 pads to 5 sorted, but to 4 as [1, 1], [2].)"""
    lengths = lengths[: len(lengths) // micro_batch_size * micro_batch_size]
    assume(lengths)
    megabatch_size = math.ceil(len(lengths) / micro_batch_size)
    batches = grouped_batches(lengths, micro_batch_size, seed, 0, megabatch_size)
    ranges = sorted((min(lengths[i] for i in b), max(lengths[i] for i in b)) for b in batches)
    assert all(high <= next_low for (_, high), (next_low, _) in zip(ranges, ranges[1:]))
    grouped = padding_efficiency(batches, lengths)
    shuffled = padding_efficiency(random_batches(len(lengths), micro_batch_size, shuffle_seed), lengths)
    assert grouped["real_tokens"] == shuffled["real_tokens"] == sum(lengths)
    assert grouped["padded_tokens"] <= shuffled["padded_tokens"]


def test_seeds_and_epochs_give_different_orders():
    lengths = spread_out(400, seed=0, low=50, high=800)
    first = grouped_batches(lengths, 8, seed=1, epoch=0)
    assert first == grouped_batches(lengths, 8, seed=1, epoch=0)
    assert first != grouped_batches(lengths, 8, seed=1, epoch=1)
    assert first != grouped_batches(lengths, 8, seed=2, epoch=0)
    assert len({tuple(map(tuple, grouped_batches(lengths, 8, seed=1, epoch=e))) for e in range(10)}) == 10


def test_spread_out_lengths_pad_far_less_than_random():
    lengths = spread_out(1000, seed=3, low=50, high=800)
    grouped = padding_efficiency(grouped_batches(lengths, 8, seed=0, epoch=0), lengths)
    shuffled = padding_efficiency(random_batches(len(lengths), 8, 0), lengths)
    assert grouped["efficiency"] >= 0.95 > 0.75 > shuffled["efficiency"]


@settings(max_examples=150, deadline=None)
@given(**settings_strategy, world_size=st.integers(1, 8))
def test_simulated_ranks_are_disjoint_and_equal(lengths, micro_batch_size, megabatch_size, seed, epoch, world_size):
    ranks = [
        grouped_batches(lengths, micro_batch_size, seed, epoch, megabatch_size, rank, world_size)
        for rank in range(world_size)
    ]
    steps = math.ceil(len(lengths) / (micro_batch_size * world_size))
    assert {len(r) for r in ranks} == {steps}  # every rank the same number of steps
    seen = Counter(flat(flat(ranks)))
    assert set(seen) == set(range(len(lengths)))  # every sample at least once
    if len(lengths) % (micro_batch_size * world_size) == 0:
        assert all(count == 1 for count in seen.values())  # disjoint
    # what is repeated are samples filling the epoch's last step, and only there
    assert seen.total() - len(lengths) == steps * micro_batch_size * world_size - len(lengths)
    assert set(Counter(flat(flat(r[:-1] for r in ranks))).values()) <= {1}


def test_ranks_at_one_step_hold_similar_lengths():
    """Consecutive micro-batches of the sorted megabatch go to the ranks of one step, so ranks wait little on each other."""
    lengths = spread_out(800, seed=5, low=50, high=800)
    ranks = [grouped_batches(lengths, 8, 0, 0, rank=rank, world_size=4) for rank in range(4)]
    spread = [
        max(max(lengths[i] for i in r[step]) for r in ranks) - min(max(lengths[i] for i in r[step]) for r in ranks)
        for step in range(len(ranks[0]))
    ]
    assert max(spread) < 150  # random micro-batches would differ by hundreds of tokens


def test_bad_settings():
    for kwargs in (dict(micro_batch_size=0), dict(megabatch_size=0), dict(rank=2, world_size=2), dict(world_size=0)):
        with pytest.raises(ValueError):
            grouped_batches([1, 2, 3], **{"micro_batch_size": 1, "seed": 0, "epoch": 0, **kwargs})
    assert grouped_batches([], 4, 0, 0) == []


# --- padding_efficiency -------------------------------------------------------------------------------------------


def test_padding_efficiency_counts_what_the_model_receives():
    lengths = [10, 4, 7, 3, 600]
    measured = padding_efficiency([[0, 1], [2, 3, 4]], lengths)
    assert (measured["real_tokens"], measured["padded_tokens"], measured["count"]) == (624, 20 + 1800, 2)
    assert measured["efficiency"] == pytest.approx(624 / 1820)
    # cut at max_seq_length 8: reals 8, 4, 7, 3, 8; batches padded to 8 and 8
    capped = padding_efficiency([[0, 1], [2, 3, 4]], lengths, max_seq_length=8)
    assert (capped["real_tokens"], capped["padded_tokens"]) == (30, 16 + 24)
    assert padding_efficiency([], lengths)["efficiency"] == 1.0


# --- the batch sampler, with litgpt's collate function ----------------------------------------------------------


def test_sampler_in_a_dataloader_pads_as_measured():
    from litgpt.data.base import get_sft_collate_fn

    lengths = spread_out(203, seed=7, low=5, high=120)
    dataset = [
        {
            "input_ids": torch.ones(n, dtype=torch.long),
            "labels": torch.ones(n, dtype=torch.long),
            "token_counts": {"raw": n, "raw_plus_prompt_template": n},
        }
        for n in lengths
    ]
    cap = 100
    sampler = grouped_sampler(lengths, 4, seed=11)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=get_sft_collate_fn(max_seq_length=cap))
    assert sampler.batches(0) == grouped_batches(lengths, 4, 11, 0) and sampler.epoch == 0  # asking does not advance
    first = [batch["input_ids"] for batch in loader]
    assert len(first) == len(loader) == 51
    measured = padding_efficiency(sampler.batches(0), lengths, cap)
    assert sum(ids.numel() for ids in first) == measured["padded_tokens"]
    epoch = flat(sampler.batches(0))  # 203 samples and one repeated, to fill the last micro-batch of 4
    assert len(epoch) == 204 and set(epoch) == set(range(203))
    assert sum(min(lengths[i], cap) for i in epoch) == measured["real_tokens"]
    assert sampler.epoch == 1
    second = list(sampler)  # each pass is the next epoch
    assert second == grouped_batches(lengths, 4, 11, 1) != sampler.batches(0)
    for rank in range(3):
        ranked = grouped_sampler(lengths, 4, 11, rank=rank, world_size=3)
        assert len(ranked) == len(list(ranked)) == 17


# --- end to end -----------------------------------------------------------------------------------------------------


def csv_column(out: Path, name: str) -> list[float]:
    (metrics,) = (out / "logs").rglob("metrics.csv")
    with open(metrics) as f:
        return [float(row[name]) for row in csv.DictReader(f) if row.get(name)]


@pytest.mark.e2e
def test_cli_grouped_vs_random(cli_here, tiny_checkpoint, make_data, tmp_path):
    """Two runs on the same data, one epoch each, learning rate 0 (the weights never change): the report's padding
    figures equal what the run really fed the model, grouping pads less, and validation is identical."""
    rng = random.Random(0)
    train = [rng.choice([60, 70, 250, 280, 350]) for _ in range(26)]  # 350 is over the limit: dropped (a Subset)
    data = make_data(train, [60, 200, 290, 350])
    kept = [n for n in train if n <= 300]
    steps = math.ceil(len(kept) / 4)  # one epoch of micro-batches of 4, one micro-batch per step
    flags = (
        "--train.micro_batch_size",
        "4",
        "--train.global_batch_size",
        "4",
        "--train.max_seq_length",
        "300",
        "--seq.over_length",
        "drop",
        "--optimizer",
        '{"class_path": "torch.optim.SGD", "init_args": {"lr": 0.0}}',
    )
    reports, val_losses = {}, {}
    for grouped in ("false", "true"):
        out = tmp_path / f"out_{grouped}"
        run = cli_here(data, out, *flags, "--seq.group_by_length", grouped, steps=steps)
        assert run.returncode == 0, run.stderr[-3000:]
        report = read_report(out)
        batches, estimate = report["batches"], report["batches_estimate"]
        assert batches["group_by_length"] is (grouped == "true") and batches["micro_batch_size"] == 4
        assert batches["count"] == steps and batches["real_tokens"] == sum(kept)
        # the cumulative padded tokens the run logged after its epoch: the report holds what the model processed
        assert max(csv_column(out, "lengths")) == batches["padded_tokens"]
        assert estimate["real_tokens"] == sum(kept) and estimate["count"] == steps
        assert estimate == {key: batches[key] for key in estimate}  # the order is a function of the seed: exact
        reports[grouped] = batches
        val_losses[grouped] = csv_column(out, "val_loss")[-1]
    assert reports["true"]["efficiency"] > reports["false"]["efficiency"]
    assert reports["true"]["padded_tokens"] < reports["false"]["padded_tokens"]
    assert val_losses["true"] == val_losses["false"]


def grouped_sampler(lengths, micro_batch_size, seed, rank=0, world_size=1) -> ResumableBatchSampler:
    return ResumableBatchSampler(
        partial(grouped_batches, lengths, micro_batch_size, seed, rank=rank, world_size=world_size)
    )


def test_expected_grouped_padding_is_the_epoch_each_rank_yields():
    lengths = spread_out(50, seed=2, low=1, high=300)
    per_rank = [
        padding_efficiency(grouped_sampler(lengths, 4, seed=0, rank=r, world_size=2).batches(0), lengths, 250)
        for r in range(2)
    ]
    estimate = expected_efficiency(lengths, 250, 4, seed=0, world_size=2)["grouped"]
    real, padded = (sum(m[key] for m in per_rank) for key in ("real_tokens", "padded_tokens"))
    assert (estimate["real_tokens"], estimate["padded_tokens"], estimate["count"]) == (real, padded, 14)


@given(lengths=lengths_strategy, micro_batch_size=st.integers(1, 16), world_size=st.integers(1, 4))
def test_expected_random_padding_covers_every_sample_as_the_ranks_deal_them(lengths, micro_batch_size, world_size):
    estimate = expected_efficiency(lengths, 1000, micro_batch_size, seed=1, world_size=world_size)["random"]
    per_rank = math.ceil(len(lengths) / world_size)  # each rank gets as many samples, the first ones repeated
    assert estimate["count"] == world_size * math.ceil(per_rank / micro_batch_size)
    assert estimate["real_tokens"] >= sum(min(n, 1000) for n in lengths)
    if len(lengths) % (world_size * micro_batch_size) == 0:  # nothing repeated to fill the last step
        assert estimate["real_tokens"] == sum(min(n, 1000) for n in lengths)
    assert estimate["real_tokens"] <= estimate["padded_tokens"] <= estimate["count"] * micro_batch_size * 1000
