"""The train and val loaders the length plan allows: only the kept samples, each cut as planned, in the resumable order."""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
from litgpt.data import DataModule
from torch.utils.data import DataLoader, Dataset, RandomSampler, Subset

from litgpt_seqlen.data import order, packing, truncation
from litgpt_seqlen.data.length_plan import LengthPlan


def make_loaders(
    fabric: L.Fabric,
    data: DataModule,
    plan: LengthPlan,
    batches_for_epoch: Callable[[int], list],
    seed: int,
    pack: bool = False,
    val_batch_size: int | None = None,
) -> tuple[DataLoader, DataLoader]:
    """Train and val loaders, set up by Fabric: the scanned datasets as the data module loads them (its batch size,
    workers and collate), over only the kept samples, each cut as planned. Under ``pack`` the train loader gives packed
    micro-batches (``micro_batch_size`` rows each); validation is never packed. The train order is
    ``batches_for_epoch`` (``order.train_batches``), so a run can resume at any micro-batch. ``val_batch_size``: other
    than the data module's (the memory search chose a smaller micro-batch)."""
    settings = {"train": data.train_dataloader(), "val": data.val_dataloader()}
    train_loader, val_loader = (
        keep_samples(settings[name], plan.datasets[name], plan.kept[name], plan.cuts[name]) for name in settings
    )
    if val_batch_size is not None and val_batch_size != val_loader.batch_size:
        val_loader = DataLoader(
            val_loader.dataset,
            batch_size=val_batch_size,
            num_workers=val_loader.num_workers,
            collate_fn=val_loader.collate_fn,
        )
    if pack:  # items are rows of samples, collated packed (ignoring -100, as the loss does)
        rows = packing.PackedRows(train_loader.dataset)
        train_loader = DataLoader(rows, num_workers=train_loader.num_workers, collate_fn=packing.packed_collate)
    train_loader = order.resumable_loader(train_loader, order.ResumableBatchSampler(batches_for_epoch), seed)
    train_loader = fabric.setup_dataloaders(train_loader, use_distributed_sampler=False)  # the order splits by rank
    return train_loader, fabric.setup_dataloaders(val_loader)


def keep_samples(loader: DataLoader, scanned: Dataset, indices: list[int], cuts: list[truncation.Plan]) -> DataLoader:
    """A loader like ``loader`` (its batch size, sampler, workers and collate_fn, built for no max_seq_length, which
    cuts nothing) over only ``indices`` of the ``scanned`` dataset, each sample cut by its plan in ``cuts``."""
    truncated = any(cuts[i].truncated for i in indices)
    dataset = truncation.TruncatedSFT(scanned, cuts) if truncated else scanned
    if len(indices) < len(scanned):
        dataset = Subset(dataset, indices)
    shuffle = isinstance(loader.sampler, RandomSampler)
    return DataLoader(
        dataset,
        batch_size=loader.batch_size,
        shuffle=shuffle,
        generator=loader.generator if shuffle else None,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
    )
