"""The train data order: this rank's micro-batches as a function of ``(seed, epoch)``.

Random (``DistributedSampler``'s order), grouped by length (``data_utils.grouped_batches``) or packed
(``packing.packed_plan``): because the order is a function, the run's step count and its padding are known before a
loader exists, and a resumed run skips to any micro-batch by handing out index lists only (nothing is read).

Every order first forms this rank's optimizer steps of exactly ``step_size`` samples (packed: rows) per epoch, the
epoch's last step filled up by repeating samples from the start of the epoch's order, and then cuts each step into
consecutive micro-batches of ``micro_batch_size``. So an epoch ends on a step boundary, and the samples of every
step are the same whatever the micro-batch size: a run whose micro-batches are smaller (with more of them per step)
trains on the same samples per optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

import data_utils
from litgpt_seqlen.data import packing


def random_batches(
    num_samples: int,
    micro_batch_size: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    *,
    step_size: int | None = None,
) -> list[list[int]]:
    """This rank's micro-batches for one epoch of shuffled samples: ``DistributedSampler``'s order for this rank (the
    epoch's permutation, ``rank::world_size``) cut into steps of ``step_size`` samples (``micro_batch_size`` when not
    given), the last one filled from the start of the permutation (``data_utils.rank_steps``), each step cut into
    micro-batches of ``micro_batch_size``."""
    sampler = DistributedSampler(range(num_samples), num_replicas=1, rank=0, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)  # one replica: the epoch's whole permutation, which rank_steps deals as torch does
    steps = data_utils.rank_steps(list(sampler), step_size or micro_batch_size, rank, world_size)
    return data_utils.micro_batches(steps, micro_batch_size)


class ResumableBatchSampler(Sampler[list[int]]):
    """A batch sampler whose epoch order is ``batches_for_epoch(epoch)`` and that can start an epoch part-way.

    Each pass hands out the current epoch's index lists from ``skip`` on and, once used up, moves to the next epoch
    (so a plain DataLoader over it cycles epochs). ``set_position(epoch, skip)`` chooses what
    the next ``iter()`` gives. The skipped index lists are never handed to the DataLoader, so no sample is read.
    (No ``set_epoch`` method on purpose: Fabric would call it with its own count of iterations.)
    """

    def __init__(self, batches_for_epoch: Callable[[int], list[list[int]]]) -> None:
        self.batches_for_epoch = batches_for_epoch
        self.epoch = 0
        self.skip = 0
        self._length = len(batches_for_epoch(0))

    def batches(self, epoch: int) -> list[list[int]]:
        return self.batches_for_epoch(epoch)

    def set_position(self, epoch: int, skip: int) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        # Advances only when a pass is used up: a DataLoader with workers calls iter() twice per pass.
        epoch, skip = self.epoch, self.skip
        yield from self.batches(epoch)[skip:]
        self.epoch, self.skip = epoch + 1, 0

    def __len__(self) -> int:
        return self._length


def resumable_loader(loader: DataLoader, batch_sampler: ResumableBatchSampler, seed: int) -> DataLoader:
    """``loader``'s dataset, collate function and workers with ``batch_sampler`` and a private generator: the
    DataLoader draws its workers' base seed from it at every ``iter()``, which would otherwise come from the global
    torch RNG and differ between a resumed and an uninterrupted run (dropout draws from that RNG)."""
    return DataLoader(
        loader.dataset,
        batch_sampler=batch_sampler,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        generator=torch.Generator().manual_seed(seed),
    )


class EpochBatches:
    """Stands in for litgpt's ``CycleIterator``: ``next()`` gives the next micro-batch, starting a new epoch when
    one ends; ``epoch`` counts finished epochs as CycleIterator's does. ``position`` is how many micro-batches of the
    current epoch were handed out, so ``EpochBatches(loader, sampler, epoch, position)`` continues exactly there."""

    def __init__(self, loader, sampler: ResumableBatchSampler | None = None, epoch: int = 0, position: int = 0) -> None:
        self.loader, self.sampler = loader, sampler if sampler is not None else loader.batch_sampler
        self.epoch, self.position = epoch, position
        self._iterator = None

    def __iter__(self):
        return self

    def __next__(self):
        if self._iterator is None:
            self._iterator = self._start(self.position)
        try:
            batch = next(self._iterator)
        except StopIteration:
            self.epoch, self.position = self.epoch + 1, 0
            self._iterator = self._start(0)
            batch = next(self._iterator)
        self.position += 1
        return batch

    def seek(self, epoch: int, position: int) -> None:
        """Continue at ``position`` micro-batches into ``epoch`` (before the first ``next()``)."""
        self.epoch, self.position, self._iterator = epoch, position, None

    def _start(self, skip: int):
        self.sampler.set_position(self.epoch, skip)
        return iter(self.loader)

    def state(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def close(self) -> None:
        """Ends the current pass now, its worker processes with it. Left to the garbage collector, a loader's worker
        pool is torn down in any order, and shutting it down then waits 5 s for each worker (torch's timeout)."""
        iterator, self._iterator = self._iterator, None
        if hasattr(iterator, "close"):  # Fabric's loader hands out a generator over torch's iterator
            iterator.close()
        del iterator  # the last reference: torch shuts the workers down now, with its queues whole


@dataclass(frozen=True)
class Order:
    """A train batch order: ``batches(lengths, max_seq_length, micro_batch_size, seed, rank=, world_size=,
    step_size=)`` gives ``epoch -> this rank's micro-batches``; ``estimate(lengths, max_seq_length, micro_batch_size,
    seed, world_size, step_size=)`` the padding of its first epoch over all ranks, for the report."""

    batches: Callable[..., Callable[[int], list[list]]]
    estimate: Callable[..., dict]


def _random(lengths, max_seq_length, micro_batch_size, seed, **placement):
    return partial(random_batches, len(lengths), micro_batch_size, seed, **placement)


def _grouped(lengths, max_seq_length, micro_batch_size, seed, **placement):
    return partial(data_utils.grouped_batches, lengths, micro_batch_size, seed, **placement)


def _unpacked_estimate(batches: Callable) -> Callable[..., dict]:
    def estimate(lengths, max_seq_length, micro_batch_size, seed, world_size=1, *, step_size=None) -> dict:
        plan = partial(batches, lengths, max_seq_length, micro_batch_size, seed, step_size=step_size)
        everyone = [batch for rank in range(world_size) for batch in plan(rank=rank, world_size=world_size)(0)]
        figures = data_utils.padding_efficiency(everyone, lengths, max_seq_length)
        return {**figures, "efficiency": round(figures["efficiency"], 6)}

    return estimate


# Every order, by the name ``SeqArgs.order`` gives it: a new order is an entry here (and its flag, and its tests).
ORDERS = {
    "random": Order(_random, _unpacked_estimate(_random)),
    "grouped": Order(_grouped, _unpacked_estimate(_grouped)),
    "packed": Order(packing.packed_plan, packing.plan_report),
}


def train_batches(
    lengths: Sequence[int],
    max_seq_length: int,
    micro_batch_size: int,
    how: str,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    *,
    step_size: int | None = None,
) -> Callable[[int], list[list]]:
    """This rank's train micro-batches (indices into ``lengths``; packed: rows of them) as a function of the epoch.
    ``how``: a name in ``ORDERS``. ``step_size``: samples (packed: rows) per rank and optimizer step,
    ``micro_batch_size`` x accumulation (``micro_batch_size`` when not given); an epoch is a whole number of such steps,
    each cut into consecutive micro-batches, and the steps do not depend on ``micro_batch_size``."""
    placement = {"rank": rank, "world_size": world_size, "step_size": step_size}
    return ORDERS[how].batches(lengths, max_seq_length, micro_batch_size, seed, **placement)


def expected_efficiency(
    lengths: Sequence[int],
    max_seq_length: int,
    micro_batch_size: int,
    seed: int,
    world_size: int = 1,
    *,
    step_size: int | None = None,
) -> dict[str, dict]:
    """The padding of the first epoch over all ranks, for each order (exact: each order is a function of the seed)."""
    return {
        how: order.estimate(lengths, max_seq_length, micro_batch_size, seed, world_size, step_size=step_size)
        for how, order in ORDERS.items()
    }


def for_run(fabric, plan, train, seq, seed: int) -> Callable[[int], list[list]]:
    """This rank's train micro-batches of ``train.micro_batch_size`` as a function of the epoch (``train_batches``), in
    whole optimizer steps of ``train``'s global batch (so a smaller micro-batch size keeps every step's samples)."""
    lengths, max_seq_length = plan.kept_lengths("train"), plan.decision.max_seq_length
    step_size = train.micro_batch_size * train.gradient_accumulation_iters(fabric.world_size, 1)  # per rank
    placement = {"rank": fabric.global_rank, "world_size": fabric.world_size, "step_size": step_size}
    return train_batches(lengths, max_seq_length, train.micro_batch_size, seq.order, seed, **placement)
