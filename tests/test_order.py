"""The train data order and what a resumed run needs to go on exactly: the batch order of every kind (random, grouped by
length, packed) as a function of (seed, epoch, rank), its optimizer steps the same samples whatever the micro-batch
size; the resumable sampler and loader, random states, the running loss."""

import math
import random
from collections import Counter

import lightning as L
import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from litgpt.data.base import get_sft_collate_fn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from litgpt_seqlen.data import order, packing
from litgpt_seqlen.training.loss import RunningLoss
from litgpt_seqlen.training.rng import capture_rng, preserved_rng, restore_rng

ORDERS = ("random", "grouped", "packed")
MAX_SEQ_LENGTH = 16


def samples_of(batch) -> list[int]:
    """The sample indices of a micro-batch, in order (a packed one is a list of rows of indices)."""
    return [i for item in batch for i in (item if isinstance(item, list) else [item])]


def epoch_samples(batches) -> list[int]:
    return [i for batch in batches for i in samples_of(batch)]


# ---------------------------------------------------------------------------------------------------------------
# The order: every sample once per epoch, over the ranks
# ---------------------------------------------------------------------------------------------------------------


def items_of(batch) -> list:
    """What a step is made of: sample indices, or for a packed micro-batch its rows (as tuples)."""
    return [tuple(item) if isinstance(item, list) else item for item in batch]


def steps_of(batches, micro_batch_size: int, step_size: int) -> list[Counter]:
    """A rank's epoch of micro-batches as its optimizer steps: ceil(step_size / micro_batch_size) micro-batches each,
    every step the multiset of its items."""
    per_step = math.ceil(step_size / micro_batch_size)
    assert len(batches) % per_step == 0  # the epoch ends on a step boundary
    return [Counter(items_of(sum(batches[j : j + per_step], []))) for j in range(0, len(batches), per_step)]


def epoch_items(lengths, how: str, seed: int, epoch: int) -> list:
    """The items one epoch deals out before any repeat: every sample, or every packed row."""
    if how == "packed":
        return [tuple(row) for row in packing.pack_rows(lengths, MAX_SEQ_LENGTH, seed, epoch)]
    return list(range(len(lengths)))


orders = {
    "lengths": st.integers(1, 40).flatmap(
        lambda n: st.lists(st.integers(1, 2 * MAX_SEQ_LENGTH), min_size=n, max_size=n)
    ),
    "step_size": st.integers(1, 8),
    "world_size": st.integers(1, 3),
    "seed": st.integers(0, 2**16),
}


@pytest.mark.parametrize("how", ORDERS)
@given(**orders)
@example(lengths=[5, 20, 3], step_size=8, world_size=1, seed=0)  # fewer samples than one step
@example(lengths=[5, 20, 3], step_size=4, world_size=3, seed=0)  # fewer samples than one step of every rank
@example(lengths=[7] * 10, step_size=4, world_size=2, seed=1)  # an epoch of 1.25 steps
def test_every_step_holds_the_same_samples_whatever_the_micro_batch_size(how, lengths, step_size, world_size, seed):
    """On every rank, in every epoch, the steps (the multisets of samples, packed: of rows) are the same for every
    micro_batch_size: cut into full micro-batches when it divides the step, a step's last one shorter otherwise."""
    for rank in range(world_size):
        reference = None
        for micro_batch_size in range(1, step_size + 2):
            plan = order.train_batches(
                lengths, MAX_SEQ_LENGTH, micro_batch_size, how, seed, rank, world_size, step_size=step_size
            )
            epochs = [plan(epoch) for epoch in range(3)]
            if step_size % micro_batch_size == 0:
                assert all(len(batch) == micro_batch_size for batches in epochs for batch in batches)
            steps = [steps_of(batches, micro_batch_size, step_size) for batches in epochs]
            reference = reference or steps
            assert steps == reference, f"rank {rank}, micro_batch_size {micro_batch_size}"


@pytest.mark.parametrize("how", ORDERS)
@given(**orders, micro_batch_size=st.integers(1, 4), epoch=st.integers(0, 5))
def test_an_epoch_is_whole_steps_of_every_sample_and_only_its_last_step_repeats(
    how, lengths, step_size, world_size, seed, micro_batch_size, epoch
):
    step_size *= micro_batch_size  # micro_batch_size x accumulation, as a run takes it
    shares = [
        order.train_batches(
            lengths, MAX_SEQ_LENGTH, micro_batch_size, how, seed, rank, world_size, step_size=step_size
        )(epoch)
        for rank in range(world_size)
    ]
    items = epoch_items(lengths, how, seed, epoch)
    steps = [steps_of(share, micro_batch_size, step_size) for share in shares]
    per_rank = math.ceil(len(items) / (step_size * world_size))
    assert [len(rank_steps) for rank_steps in steps] == [per_rank] * world_size  # no rank waits on another
    assert all(sum(step.values()) == step_size for rank_steps in steps for step in rank_steps)
    seen = sum((step for rank_steps in steps for step in rank_steps), Counter())
    assert set(seen) == set(items)  # every sample (packed: row), on some rank
    before_last = sum((step for rank_steps in steps for step in rank_steps[:-1]), Counter())
    assert set(before_last.values()) <= {1}  # no repeat before the epoch's last step
    assert seen.total() - len(items) == per_rank * step_size * world_size - len(items)  # what fills the last step
    if len(items) % (step_size * world_size) == 0:
        assert set(seen.values()) == {1}  # whole steps: exactly once, the ranks disjoint
    again = order.train_batches(
        lengths, MAX_SEQ_LENGTH, micro_batch_size, how, seed, 0, world_size, step_size=step_size
    )
    assert again(epoch) == shares[0]  # a function of (seed, epoch, rank): a resumed run computes the same


@pytest.mark.parametrize("how", ORDERS)
@given(**orders)
def test_a_step_of_one_micro_batch_is_the_default(how, lengths, step_size, world_size, seed):
    """Without a step size, a step is one micro-batch: every micro-batch full, the epoch's last one filled."""
    micro_batch_size = step_size
    for rank in range(world_size):
        default = order.train_batches(lengths, MAX_SEQ_LENGTH, micro_batch_size, how, seed, rank, world_size)
        explicit = order.train_batches(
            lengths, MAX_SEQ_LENGTH, micro_batch_size, how, seed, rank, world_size, step_size=micro_batch_size
        )
        assert default(1) == explicit(1)
        assert all(len(batch) == micro_batch_size for batch in default(1))


@given(
    num_samples=st.integers(1, 40), step_size=st.integers(1, 8), world_size=st.integers(1, 4), seed=st.integers(0, 99)
)
def test_random_steps_follow_the_distributed_samplers_order(num_samples, step_size, world_size, seed):
    """Each rank's samples are DistributedSampler's for it, in its order, then what fills the last step."""
    for rank in range(world_size):
        sampler = DistributedSampler(range(num_samples), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        sampler.set_epoch(3)
        ours = order.random_batches(num_samples, 1, seed, 3, rank, world_size, step_size=step_size)
        assert epoch_samples(ours)[: len(sampler)] == list(sampler)


def test_grouped_steps_hold_similar_lengths_and_shrinking_micro_batches_keep_them_sorted():
    lengths = [random.Random(i).randint(1, 500) for i in range(300)]
    plan = order.train_batches(lengths, 500, 2, "grouped", 0, step_size=8)
    spreads = []
    for batches in (plan(0)[j : j + 4] for j in range(0, len(plan(0)), 4)):
        step = [lengths[i] for i in epoch_samples(batches)]
        assert step == sorted(step, reverse=True)  # longest first within the step, so within its micro-batches
        spreads.append(step[0] - step[-1])
    assert sorted(spreads)[len(spreads) // 2] < 100  # random steps of 8 would spread over most of 1..500


@pytest.mark.parametrize("how", ORDERS)
def test_each_epoch_and_each_seed_has_its_own_order(how):
    lengths = [random.Random(i).randint(1, MAX_SEQ_LENGTH) for i in range(30)]
    epochs = [tuple(epoch_samples(order.train_batches(lengths, MAX_SEQ_LENGTH, 2, how, 1)(e))) for e in range(4)]
    assert len(set(epochs)) == 4
    assert all(set(samples) == set(range(30)) for samples in epochs)
    other_seed = tuple(epoch_samples(order.train_batches(lengths, MAX_SEQ_LENGTH, 2, how, 2)(0)))
    assert other_seed != epochs[0]


def test_random_batches_are_full_and_repeat_only_to_fill_the_last_step():
    for world_size in (1, 2, 4):
        shares = [
            order.random_batches(20, 3, seed=5, epoch=1, rank=r, world_size=world_size) for r in range(world_size)
        ]
        assert all(len(batch) == 3 for share in shares for batch in share)
        everyone = Counter(i for share in shares for i in epoch_samples(share))
        assert set(everyone) == set(range(20)) and everyone.total() == 20 + -20 % (3 * world_size)
        before_last = [i for share in shares for i in epoch_samples(share[:-1])]
        assert len(before_last) == len(set(before_last))


def test_grouping_pads_less_than_random_order_and_the_figures_count_every_rank():
    lengths = [random.Random(i).choice([3, 4, 60, 64, 120, 128]) for i in range(200)]
    figures = order.expected_efficiency(lengths, 128, 4, seed=3, world_size=2)
    assert list(figures) == ["random", "grouped", "packed"]
    assert figures["random"]["efficiency"] < figures["grouped"]["efficiency"]
    assert figures["random"]["efficiency"] < figures["packed"]["efficiency"]
    per_rank = len(order.train_batches(lengths, 128, 4, "random", 3, 0, 2)(0))
    assert figures["random"]["count"] == 2 * per_rank


# ---------------------------------------------------------------------------------------------------------------
# Resuming part-way through an epoch
# ---------------------------------------------------------------------------------------------------------------


class CountingDataset(Dataset):
    """Samples of given token lengths; records every ``__getitem__``."""

    def __init__(self, lengths: list[int], vocab: int = 64) -> None:
        self.lengths, self.reads = lengths, []
        generator = torch.Generator().manual_seed(0)
        self.tokens = [torch.randint(1, vocab, (n,), generator=generator) for n in lengths]

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> dict:
        self.reads.append(index)
        ids = self.tokens[index]
        return {
            "input_ids": ids,
            "labels": ids.clone(),
            "token_counts": {"raw": len(ids), "raw_plus_prompt_template": len(ids)},
        }


LENGTHS = [3, 9, 4, 7, 5, 8, 2, 6, 11, 3, 5]


def resumable(how: str, lengths: list[int] = LENGTHS, micro_batch_size: int = 2, seed: int = 7, workers: int = 0):
    """(dataset, sampler, loader) as the flow builds them for ``how``."""
    dataset = CountingDataset(lengths)
    sampler = order.ResumableBatchSampler(order.train_batches(lengths, 12, micro_batch_size, how, seed))
    if how == "packed":
        plain = DataLoader(packing.PackedRows(dataset), num_workers=workers, collate_fn=packing.packed_collate)
    else:
        plain = DataLoader(dataset, num_workers=workers, collate_fn=get_sft_collate_fn())
    return dataset, sampler, order.resumable_loader(plain, sampler, seed)


@pytest.mark.parametrize("how", ORDERS)
def test_skipping_reads_only_the_remaining_batches_of_the_epoch(how):
    dataset, sampler, loader = resumable(how, micro_batch_size=1 if how == "packed" else 2)
    per_epoch = len(sampler)
    assert per_epoch >= 4
    straight = order.EpochBatches(loader, sampler)
    uninterrupted = [next(straight)["input_ids"] for _ in range(3 * per_epoch)]  # three epochs
    assert (straight.epoch, straight.position) == (2, per_epoch)

    dataset.reads.clear()
    resumed = order.EpochBatches(loader, sampler, epoch=1, position=3)
    following = [next(resumed)["input_ids"] for _ in range(per_epoch - 3 + 2)]  # rest of epoch 1, 2 of epoch 2
    assert dataset.reads == epoch_samples(sampler.batches(1)[3:] + sampler.batches(2)[:2])
    expected = uninterrupted[per_epoch + 3 : 2 * per_epoch + 2]
    assert all(torch.equal(a, b) for a, b in zip(following, expected, strict=True))
    assert resumed.state() == {"epoch": 2, "position": 2}


def test_seek_continues_where_the_state_says():
    _, sampler, loader = resumable("random")
    batches = order.EpochBatches(loader, sampler)
    for _ in range(3):
        next(batches)
    saved = batches.state()
    expected = [next(batches)["input_ids"] for _ in range(4)]
    other = order.EpochBatches(loader, sampler)
    next(other)
    other.seek(**saved)
    assert all(torch.equal(next(other)["input_ids"], batch) for batch in expected)


def test_worker_processes_see_each_epoch_once_in_order():
    """A DataLoader with workers calls the batch sampler's iter() twice per pass; epochs must still go 0, 1, 2."""
    lengths = [5, 12, 7, 9, 3, 14, 6]
    batches_for_epoch = order.train_batches(lengths, 16, 2, "random", 7)
    sampler = order.ResumableBatchSampler(batches_for_epoch)
    loader = DataLoader(list(range(len(lengths))), batch_sampler=sampler, num_workers=2, collate_fn=list)
    passes = [list(loader) for _ in range(3)]
    assert passes == [batches_for_epoch(epoch) for epoch in range(3)]
    sampler.set_position(1, 2)
    assert list(loader) == batches_for_epoch(1)[2:]
    assert list(loader) == batches_for_epoch(2)


@pytest.mark.parametrize("how", ["random", "packed"])
def test_a_resumed_loader_with_workers_reads_only_the_remaining_batches(how):
    _, sampler, straight_loader = resumable(how)
    straight = order.EpochBatches(straight_loader, sampler)
    uninterrupted = [next(straight)["input_ids"] for _ in range(2 * len(sampler))]
    _, sampler, loader = resumable(how, workers=2)
    resumed = order.EpochBatches(loader, sampler, epoch=0, position=2)
    following = [next(resumed)["input_ids"] for _ in range(len(sampler))]
    assert all(torch.equal(a, b) for a, b in zip(following, uninterrupted[2 : 2 + len(sampler)], strict=True))


def test_fabric_wrapped_loader_keeps_the_order_and_the_global_rng():
    """Set up by Fabric as the flow does (use_distributed_sampler=False), the loader hands out the sampler's batches
    in order across epochs, and starting an epoch draws nothing from the global torch RNG (dropout's)."""
    fabric = L.Fabric(accelerator="cpu", devices=1)
    dataset, sampler, loader = resumable("random", lengths=[3, 9, 4, 7, 5], seed=3)
    loader = fabric.setup_dataloaders(loader, use_distributed_sampler=False)
    assert len(loader) == 3
    batches = order.EpochBatches(loader, sampler, epoch=1, position=1)
    torch.manual_seed(0)
    expected_draw = torch.rand(1)
    torch.manual_seed(0)
    for _ in range(4):
        next(batches)
    assert torch.equal(torch.rand(1), expected_draw)
    assert dataset.reads == epoch_samples(sampler.batches(1)[1:] + sampler.batches(2)[:2])


def test_an_epoch_ended_exactly_at_the_checkpoint_continues_with_the_next():
    lengths = [3, 4, 5, 6]
    dataset, sampler, loader = resumable("random", lengths=lengths, seed=1)
    resumed = order.EpochBatches(loader, sampler, epoch=0, position=2)  # epoch 0 has 2 micro-batches: all trained
    batch = next(resumed)
    assert resumed.state() == {"epoch": 1, "position": 1}
    assert dataset.reads == sampler.batches(1)[0]
    first = sampler.batches(1)[0][0]
    assert torch.equal(batch["input_ids"][0][: lengths[first]], dataset.tokens[first])


# ---------------------------------------------------------------------------------------------------------------
# Random states and the running loss
# ---------------------------------------------------------------------------------------------------------------


def draws() -> tuple:
    return random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3).tolist()


def test_rng_states_round_trip_through_a_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    torch.save(capture_rng(), tmp_path / "rng.pt")
    expected = draws()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draws() == expected


def test_preserved_rng_puts_the_states_back_even_after_an_error():
    torch.manual_seed(4), random.seed(4), np.random.seed(4)
    expected = draws()
    torch.manual_seed(4), random.seed(4), np.random.seed(4)
    with preserved_rng():
        draws()
    with pytest.raises(RuntimeError), preserved_rng():
        draws()
        raise RuntimeError
    assert draws() == expected


def test_the_running_loss_window_round_trips():
    losses = [torch.tensor(x) for x in (1.0, 2.0, 4.0, 8.0, 16.0)]
    straight = RunningLoss(window=3)
    for loss in losses[:4]:
        straight.update(loss)
    assert straight.compute() == torch.tensor((2.0 + 4.0 + 8.0) / 3)
    state = straight.state_dict()
    resumed = RunningLoss(window=3)
    resumed.load_state_dict(state)
    straight.update(losses[4])
    resumed.update(losses[4])
    assert resumed.compute() == straight.compute() == torch.tensor((4.0 + 8.0 + 16.0) / 3)
    assert all(value.device.type == "cpu" for value in state["values"])


def test_closing_the_epochs_ends_the_loaders_worker_processes_at_once():
    """Left to the garbage collector, a half-used loader's workers are shut down in any order, 5 s each; closed, now."""
    import multiprocessing

    from torch.utils.data import DataLoader

    from litgpt_seqlen.data.order import EpochBatches, ResumableBatchSampler, random_batches

    sampler = ResumableBatchSampler(lambda epoch: random_batches(40, 2, 0, epoch))
    batches = EpochBatches(DataLoader(list(range(40)), batch_sampler=sampler, num_workers=2), sampler)
    next(batches), next(batches)
    assert len(multiprocessing.active_children()) >= 2
    batches.close()
    assert not multiprocessing.active_children()


def test_every_order_the_flags_choose_is_one_of_the_orders():
    from litgpt_seqlen.args import SeqArgs

    chosen = {SeqArgs(pack=pack, group_by_length=grouped).order for pack in (False, True) for grouped in (False, True)}
    assert chosen == set(order.ORDERS)
    estimates = order.expected_efficiency([5, 9, 3, 7, 2, 8], 10, 2, seed=0, world_size=2, step_size=2)
    assert list(estimates) == list(order.ORDERS) and all(0 < e["efficiency"] <= 1 for e in estimates.values())
