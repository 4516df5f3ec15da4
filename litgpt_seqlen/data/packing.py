"""Packing whole samples into rows of at most max_seq_length tokens (--seq.pack), as plain functions over lengths.

Nothing here touches a model: the plan (which samples share a row, which rows make a micro-batch, which micro-batches
go to which rank) is made from the sample lengths, ``--seed`` and the epoch, so it can be tested and estimated in a
dry run. ``packed_collate`` turns a micro-batch of rows into what the packed forward
(``litgpt_seqlen.model.packed_forward.GPT``) reads.

A row holds whole samples, never a part of one; the rows are packed whatever the micro-batch and step sizes, then
dealt into optimizer steps of ``step_size`` rows per rank (``data_utils.rank_steps``), each cut into micro-batches of
``micro_batch_size`` rows, padded to its longest row.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Callable, Sequence
from functools import partial

import torch

import data_utils

IGNORE_INDEX = -100


DEFAULT_GROUP_SIZE = 500  # samples packed together; larger packs tighter, smaller varies the rows more between epochs


def best_fit_decreasing(indices: Sequence[int], lengths: Sequence[int], max_seq_length: int) -> list[list[int]]:
    """Rows (lists of sample indices, longest sample first) whose lengths sum to at most ``max_seq_length``.

    Longest sample first, each sample goes into the row with the least room left that still fits it, or a new row.
    A sample longer than ``max_seq_length`` counts as ``max_seq_length`` (the dataset cuts it there) and fills a row.
    Ties keep the order of ``indices``, so the result depends only on it.
    """
    order = sorted(indices, key=lambda i: -min(lengths[i], max_seq_length))
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens left, row number), sorted: a row that is full drops out
    for i in order:
        length = min(lengths[i], max_seq_length)
        slot = bisect.bisect_left(room, (length, -1))
        if slot == len(room):
            rows.append([i])
            left, row = max_seq_length - length, len(rows) - 1
        else:
            left, row = room.pop(slot)
            rows[row].append(i)
            left -= length
        if left > 0:
            bisect.insort(room, (left, row))
    return rows


def pack_rows(
    lengths: Sequence[int], max_seq_length: int, seed: int, epoch: int, group_size: int = DEFAULT_GROUP_SIZE
) -> list[list[int]]:
    """Every sample exactly once, in rows of at most ``max_seq_length`` tokens, in shuffled order.

    The samples are shuffled, cut into groups of ``group_size``, each group is packed by best-fit-decreasing, and
    the rows of all groups are shuffled. Depends only on ``(seed, epoch)``: every rank computes the same list.
    """
    if max_seq_length < 1 or group_size < 1:
        raise ValueError(f"bad packing settings: {max_seq_length=}, {group_size=}")
    rng = random.Random(f"pack/{seed}/{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    rows = [
        row
        for start in range(0, len(order), group_size)
        for row in best_fit_decreasing(order[start : start + group_size], lengths, max_seq_length)
    ]
    rng.shuffle(rows)
    return rows


def packed_batches(
    lengths: Sequence[int],
    max_seq_length: int,
    micro_batch_size: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    group_size: int = DEFAULT_GROUP_SIZE,
    *,
    step_size: int | None = None,
) -> list[list[list[int]]]:
    """This rank's micro-batches for one epoch: each a list of up to ``micro_batch_size`` rows (``pack_rows``).

    The epoch's rows are dealt into this rank's steps of ``step_size`` rows (``micro_batch_size`` when not given) by
    ``data_utils.rank_steps``: the last step of all ranks is filled up by repeating rows from the start of the epoch's
    rows (as ``DistributedSampler`` repeats samples), so every rank takes the same number of steps and every sample is
    seen at least once (exactly once when the rows fill whole steps). Each step is cut into consecutive micro-batches
    of ``micro_batch_size`` rows; the steps do not depend on ``micro_batch_size``.
    """
    rows = pack_rows(lengths, max_seq_length, seed, epoch, group_size)
    return _rank_batches(rows, micro_batch_size, step_size, rank, world_size)


def all_ranks_batches(
    lengths: Sequence[int],
    max_seq_length: int,
    micro_batch_size: int,
    seed: int,
    epoch: int,
    world_size: int = 1,
    group_size: int = DEFAULT_GROUP_SIZE,
    *,
    step_size: int | None = None,
) -> list[list[list[int]]]:
    """The micro-batches of all ranks for one epoch (those of rank ``r`` at ``r::world_size``), with the repeats that
    fill the last step: what the report measures."""
    rows = pack_rows(lengths, max_seq_length, seed, epoch, group_size)
    shares = [_rank_batches(rows, micro_batch_size, step_size, rank, world_size) for rank in range(world_size)]
    return [batch for batches in zip(*shares) for batch in batches]


def _rank_batches(rows, micro_batch_size: int, step_size: int | None, rank: int, world_size: int) -> list:
    steps = data_utils.rank_steps(rows, step_size or micro_batch_size, rank, world_size)
    return [[list(row) for row in batch] for batch in data_utils.micro_batches(steps, micro_batch_size)]


def fullest_rows(lengths: Sequence[int], max_seq_length: int, micro_batch_size: int) -> list[list[int]]:
    """The largest packed micro-batch this data can give, for the rehearsal: the ``micro_batch_size`` fullest rows of
    all samples packed together (``micro_batch_size`` rows of up to max_seq_length tokens)."""
    rows = best_fit_decreasing(range(len(lengths)), lengths, max_seq_length)
    return sorted(rows, key=lambda row: -row_tokens(row, lengths, max_seq_length))[:micro_batch_size]


def packing_efficiency(batches: Sequence[Sequence[Sequence[int]]], lengths: Sequence[int], max_seq_length: int) -> dict:
    """What the model processes for ``batches`` (micro-batches of rows of sample indices into ``lengths``).

    A micro-batch is padded to its longest row (``packed_collate`` does so), so processed tokens = sum over
    micro-batches of rows x longest row; real tokens = sum of the samples' lengths, each cut at max_seq_length.
    """
    rows = [row for batch in batches for row in batch]
    real = sum(min(lengths[i], max_seq_length) for row in rows for i in row)
    processed = sum(
        len(batch) * max(row_tokens(row, lengths, max_seq_length) for row in batch) for batch in batches if batch
    )
    return {
        "count": len(batches),
        "rows": len(rows),
        "samples": sum(len(row) for row in rows),
        "samples_per_row": round(sum(len(row) for row in rows) / len(rows), 3) if rows else 0.0,
        "real_tokens": real,
        "padded_tokens": processed,
        "efficiency": real / processed if processed else 1.0,
    }


def row_tokens(row: Sequence[int], lengths: Sequence[int], max_seq_length: int) -> int:
    return sum(min(lengths[i], max_seq_length) for i in row)


def packed_collate(rows: Sequence[Sequence[dict]], pad_id: int = 0, ignore_index: int = IGNORE_INDEX) -> dict:
    """A micro-batch of rows (each a list of SFTDataset items) as tensors of shape (rows, longest row):

    ``input_ids`` (padding: ``pad_id``); ``labels`` (``ignore_index`` on padding and on each sample's first token);
    ``position_ids`` (0, 1, ... from each sample's start); ``token_counts`` as litgpt's collate gives them, one entry
    per sample; and ``segment_lengths``, a list per row of the lengths of its samples, in order (the rest of the row is
    padding).

    litgpt's loss compares ``logits[:, t]`` with ``labels[:, t + 1]``. Setting each sample's first label to
    ``ignore_index`` means the last token of one sample never has the next sample's first token as a target;
    unpacked, that label is never used anyway (it has no previous token), so the targets are the same.
    """
    width = max(sum(len(item["input_ids"]) for item in row) for row in rows)
    shape = (len(rows), width)
    batch = {
        "input_ids": torch.full(shape, pad_id, dtype=torch.int64),
        "labels": torch.full(shape, ignore_index, dtype=torch.int64),
        "position_ids": torch.zeros(shape, dtype=torch.int64),
    }
    segment_lengths = []
    for r, row in enumerate(rows):
        start = 0
        for item in row:
            end = start + len(item["input_ids"])
            batch["input_ids"][r, start:end] = item["input_ids"]
            batch["labels"][r, start + 1 : end] = item["labels"][1:]
            batch["position_ids"][r, start:end] = torch.arange(end - start)
            start = end
        batch["position_ids"][r, start:] = torch.arange(width - start)
        segment_lengths.append([len(item["input_ids"]) for item in row])
    items = [item for row in rows for item in row]
    batch["token_counts"] = {
        key: torch.tensor([item["token_counts"][key] for item in items], dtype=torch.int64).unsqueeze(1)
        for key in ("raw", "raw_plus_prompt_template")
    }
    batch["segment_lengths"] = segment_lengths
    return batch


class PackedRows(torch.utils.data.Dataset):
    """A dataset whose items are rows: ``PackedRows(dataset)[[3, 17, 5]]`` is the list of those samples.

    With a ``ResumableBatchSampler`` over ``packed_plan`` as the loader's ``batch_sampler`` (it yields lists of rows) and ``packed_collate``
    as its ``collate_fn``, a ``DataLoader`` gives packed micro-batches, also with worker processes."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, row: Sequence[int]) -> list[dict]:
        return [self.dataset[i] for i in row]


def packed_plan(
    lengths: Sequence[int],
    max_seq_length: int,
    micro_batch_size: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    group_size: int = DEFAULT_GROUP_SIZE,
    *,
    step_size: int | None = None,
) -> Callable[[int], list[list[list[int]]]]:
    """``epoch -> this rank's micro-batches`` (``packed_batches``), each a list of rows of sample indices."""
    placement = {"rank": rank, "world_size": world_size, "group_size": group_size, "step_size": step_size}
    return partial(packed_batches, list(lengths), max_seq_length, micro_batch_size, seed, **placement)


def plan_report(
    lengths: Sequence[int],
    max_seq_length: int,
    micro_batch_size: int,
    seed: int,
    world_size: int = 1,
    group_size: int = DEFAULT_GROUP_SIZE,
    *,
    step_size: int | None = None,
) -> dict:
    """The packed micro-batches of the first epoch, all ranks together, measured (``packing_efficiency``): exact,
    since the plan depends only on the lengths, the seed and the epoch (and the step and micro-batch sizes)."""
    sizes = {"world_size": world_size, "group_size": group_size, "step_size": step_size}
    everyone = all_ranks_batches(lengths, max_seq_length, micro_batch_size, seed, 0, **sizes)
    measured = packing_efficiency(everyone, lengths, max_seq_length)
    measured["efficiency"] = round(measured["efficiency"], 6)
    return {**measured, "packed": True, "micro_batch_size": micro_batch_size, "group_size": group_size}
