"""Length work on Fabric: load the splits, scan them across ranks, decide, build the loaders the plan allows, report.

``data_utils`` holds the logic over plain values; this module connects it to litgpt's data modules, to torch's
DataLoader and to the ranks of a Fabric run. Nothing here builds a model or reads a weight.
"""

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.core.hooks import DataHooks
from litgpt.args import TrainArgs
from litgpt.data import DataModule
from litgpt.tokenizer import Tokenizer
from torch.utils.data import DataLoader, RandomSampler, Sampler, Subset

import cli_support
import data_utils
import input_checks
import run_lock
from data_utils import Decision, UserInputError
from seq_args import SeqArgs


@dataclass
class LengthPlan:
    """What the scan found and what was decided, settled before the model exists."""

    decision: Decision
    lengths: dict[str, list[int]]  # every sample's length, per split, in dataset order
    kept: dict[str, list[int]]  # the indices each split keeps under --seq.over_length, in order
    datasets: dict[str, object]  # the untruncated datasets that were scanned
    warnings: list[dict] = field(default_factory=list)  # outcomes that train on little or nothing (input_checks)
    located: input_checks.DataFiles | None = None  # where each sample sits in the user's files (JSON module only)

    def where(self, split: str, index: int) -> str | None:
        """A sample's place in the user's file ("position 10 of /data/all.json"), or None when unknown."""
        return self.located.where(split, index) if self.located else None

    def kept_lengths(self, split: str) -> list[int]:
        """The lengths of the kept samples, in the order the loaders see them."""
        return [self.lengths[split][i] for i in self.kept[split]]

    def dropped(self) -> list[tuple[str, int, int, object]]:
        """(split, index, length, sample) of every sample left out."""
        rows = []
        for split, lengths in self.lengths.items():
            kept = set(self.kept[split])
            samples = getattr(self.datasets[split], "data", None)
            for i in (i for i in range(len(lengths)) if i not in kept):
                rows.append((split, i, lengths[i], samples[i] if samples is not None else None))
        return rows


def plan_lengths(
    fabric: L.Fabric,
    data: DataModule,
    tokenizer: Tokenizer,
    train: TrainArgs,
    seq: SeqArgs,
    block_size: int,
    located: input_checks.DataFiles | None = None,
) -> LengthPlan:
    """Scan every split untruncated, decide max_seq_length, apply the over-length policy and find what would train
    on little or nothing. ``located`` (from ``input_checks.check_data_files``) names samples by their place in the
    user's files, in errors, warnings and dropped_samples.jsonl."""
    splits = load_splits(fabric, data, tokenizer, train.micro_batch_size, max_seq_length=None)
    workers = seq.scan_workers if seq.scan_workers is not None else max(1, getattr(data, "num_workers", 1))
    lengths = {name: scan_split(fabric, loader.dataset, name, workers) for name, loader in splits.items()}
    decision = data_utils.decide_max_seq_length(lengths, block_size, seq.headroom, train.max_seq_length)
    where = located.where if located else None
    kept = data_utils.apply_over_length(lengths, decision, seq.over_length, where=where)
    datasets = {name: loader.dataset for name, loader in splits.items()}
    plan = LengthPlan(decision, lengths, kept, datasets, located=located)
    plan.warnings = input_checks.plan_warnings(plan, data, tokenizer, seq.over_length, where=where)
    return plan


def load_splits(
    fabric: L.Fabric, data: DataModule, tokenizer: Tokenizer, batch_size: int, max_seq_length: int | None
) -> dict[str, DataLoader]:
    """The data module's loaders for train, val and (when it has one) test, with samples cut at ``max_seq_length``."""
    data.connect(tokenizer=tokenizer, batch_size=batch_size, max_seq_length=max_seq_length)
    with fabric.rank_zero_first():
        data.prepare_data()
    data.setup()

    def empty(name: str) -> UserInputError:
        hint = " (set --data.val_split_fraction, or add samples to the val file)" if name == "val" else ""
        return UserInputError(
            f"The {name} split of {describe(data)} is empty{hint}: nothing to {'train on' if name == 'train' else 'validate with'}."
        )

    try:
        splits = {"train": data.train_dataloader()}
    except ValueError as problem:  # a shuffling loader refuses an empty dataset
        if "num_samples=0" in str(problem):
            raise empty("train") from None
        raise
    splits["val"] = data.val_dataloader()
    if type(data).test_dataloader is not DataHooks.test_dataloader:
        splits["test"] = data.test_dataloader()
    for name in ("train", "val"):
        if len(splits[name].dataset) == 0:
            raise empty(name)
    return splits


def describe(data: DataModule) -> str:
    """The data module as a user named it: its class and its file (the repr prints prompt-style objects)."""
    path = getattr(data, "json_path", None) or getattr(data, "download_dir", None)
    return f"{type(data).__name__}({path})" if path is not None else type(data).__name__


def scan_split(fabric: L.Fabric, dataset, split: str, workers: int) -> list[int]:
    """Every sample's length. Each rank scans its own contiguous share; the shares are gathered in order."""
    share = math.ceil(len(dataset) / fabric.world_size)
    start = min(len(dataset), fabric.global_rank * share)
    stop = min(len(dataset), start + share)
    problem = None
    try:
        mine = data_utils.scan_lengths(dataset, split, start, stop, workers, progress=fabric.global_rank == 0)
    except UserInputError as error:
        mine, problem = [], error
    cli_support.agree_on_error(fabric, problem)  # every rank raises the failing rank's message; rank 0 prints it
    if fabric.world_size == 1:
        return mine
    padded = torch.full((share,), -1, dtype=torch.long, device=fabric.device)  # -1 pads a short share
    padded[: len(mine)] = torch.tensor(mine, dtype=torch.long)
    gathered = fabric.all_gather(padded).cpu()
    return [n for n in gathered.flatten().tolist() if n >= 0]


# ---------------------------------------------------------------------------------------------------------------
# The loaders the plan allows
# ---------------------------------------------------------------------------------------------------------------


def make_loaders(
    fabric: L.Fabric,
    data: DataModule,
    tokenizer: Tokenizer,
    plan: LengthPlan,
    micro_batch_size: int,
    group_by_length: bool,
    seed: int,
) -> tuple[DataLoader, DataLoader]:
    """Train and val loaders, set up by Fabric: samples cut at the decided length, only the kept ones."""
    splits = load_splits(fabric, data, tokenizer, micro_batch_size, max_seq_length=plan.decision.max_seq_length)
    for name in ("train", "val"):
        check_same_split(name, plan.datasets[name], splits[name].dataset, data)
    train_loader = keep_samples(splits["train"], plan.kept["train"])
    val_loader = keep_samples(splits["val"], plan.kept["val"])
    if not group_by_length:
        return fabric.setup_dataloaders(train_loader, val_loader)
    sampler = GroupedBatchSampler(
        plan.kept_lengths("train"), micro_batch_size, seed, fabric.global_rank, fabric.world_size
    )
    train_loader = DataLoader(
        train_loader.dataset,
        batch_sampler=sampler,
        num_workers=train_loader.num_workers,
        collate_fn=train_loader.collate_fn,
    )
    train_loader = fabric.setup_dataloaders(
        train_loader, use_distributed_sampler=False
    )  # the sampler splits by rank itself
    return train_loader, fabric.setup_dataloaders(val_loader)


def check_same_split(name: str, scanned, connected, data: DataModule) -> None:
    """The kept indices were found on the scanned dataset; they only mean the same samples if the data module gave
    the same samples, in the same order, when it was set up again with the decided length."""

    def samples(dataset) -> list | None:
        data = getattr(dataset, "data", None)  # SFTDataset's list of samples (a Subset after a random split)
        return None if data is None else [data[i] for i in range(len(data))]

    if len(scanned) != len(connected) or samples(scanned) != samples(connected):
        raise UserInputError(
            f"The {name} split of {describe(data)} changed between two setups of the data module (different samples or order),"
            " so the length plan cannot be applied to it. Make its split deterministic (e.g. a fixed --data.seed)."
        )


def keep_samples(loader: DataLoader, indices: list[int]) -> DataLoader:
    """The same loader over only ``indices`` of its dataset (the loader itself when all are kept)."""
    if len(indices) == len(loader.dataset):
        return loader
    shuffle = isinstance(loader.sampler, RandomSampler)
    return DataLoader(
        Subset(loader.dataset, indices),
        batch_size=loader.batch_size,
        shuffle=shuffle,
        generator=loader.generator if shuffle else None,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
    )


class GroupedBatchSampler(Sampler[list[int]]):
    """Batch sampler for --seq.group_by_length: ``data_utils.grouped_batches`` of this rank, a new epoch per pass."""

    def __init__(
        self, lengths: list[int], micro_batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        self.lengths, self.micro_batch_size, self.seed, self.rank, self.world_size = (
            lengths,
            micro_batch_size,
            seed,
            rank,
            world_size,
        )
        self.epoch = 0

    def batches(self, epoch: int) -> list[list[int]]:
        return data_utils.grouped_batches(
            self.lengths, self.micro_batch_size, self.seed, epoch, rank=self.rank, world_size=self.world_size
        )

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        return iter(self.batches(epoch))

    def __len__(self) -> int:
        return math.ceil(math.ceil(len(self.lengths) / self.micro_batch_size) / self.world_size)


# ---------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------


def publish_plan(
    fabric: L.Fabric, out_dir: Path, plan: LengthPlan, seq: SeqArgs, micro_batch_size: int, seed: int
) -> dict:
    """Print the decision and the warnings, write seq_lengths.json (and dropped_samples.jsonl under drop), log the key
    figures. Files an earlier run left that this run does not rewrite are removed first; a dry run into an out_dir
    with a trained run writes its own files beside it (``run_lock.report_files``)."""
    decision = plan.decision
    if decision.capped and decision.source == "override":
        fabric.print(
            f"warning: --train.max_seq_length {decision.wanted} is above the model's block_size {decision.block_size}; using {decision.block_size}."
        )
    report = build_report(plan, seq)
    report["batches_estimate"] = data_utils.estimate_padding(
        plan.kept_lengths("train"),
        micro_batch_size,
        decision.max_seq_length,
        seq.group_by_length,
        seed,
        fabric.world_size,
    )
    report["batches_estimate"].update(micro_batch_size=micro_batch_size, group_by_length=seq.group_by_length)
    report["warnings"] = plan.warnings
    report["dry_run"] = seq.dry_run
    if fabric.global_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        files = run_lock.report_files(out_dir, dry_run=seq.dry_run, drop=seq.over_length == "drop")
        if files.dropped is not None:
            source = plan.located.source if plan.located else None
            data_utils.write_dropped(files.dropped, plan.dropped(), source=source)
        print_report(fabric, report, plan)
        for line in input_checks.warning_lines(plan.warnings):
            fabric.print(line)
        if files.note:
            fabric.print(files.note)
        write_report(fabric, out_dir, report, name=files.report.name)
    fabric.log_dict(key_figures(report), step=0)
    return report


def build_report(plan: LengthPlan, seq: SeqArgs) -> dict:
    decision = plan.decision
    splits = {}
    for name, split_lengths in plan.lengths.items():
        splits[name] = data_utils.split_stats(split_lengths, decision.max_seq_length)
        if seq.over_length == "drop":
            splits[name]["dropped"] = len(split_lengths) - len(plan.kept[name])
            splits[name]["tokens_truncated"] = 0
    every_length = [n for split_lengths in plan.lengths.values() for n in split_lengths]
    return {
        "max_seq_length": decision.max_seq_length,
        "source": decision.source,
        "longest": decision.longest,
        "longest_split": decision.longest_split,
        "headroom": decision.headroom,
        "block_size": decision.block_size,
        "capped": decision.capped,
        "over_length": seq.over_length,
        "summary": decision.summary(),
        "splits": splits,
        "what_if": data_utils.what_if(every_length, decision.block_size, chosen=decision.max_seq_length),
    }


def print_report(fabric: L.Fabric, report: dict, plan: LengthPlan) -> None:
    decision = plan.decision
    fabric.print(decision.summary())
    columns = ("count", "min", "mean", "p50", "p90", "p99", "max", "argmax", "over_limit", "tokens_truncated")
    extra = ("dropped",) if report["over_length"] == "drop" else ()
    fabric.print("  split  " + " ".join(f"{c:>10}" for c in columns + extra))
    for name, stats in report["splits"].items():
        fabric.print(
            f"  {name:<6} " + " ".join(f"{'-' if stats[c] is None else stats[c]:>10}" for c in columns + extra)
        )
    fabric.print(data_utils.format_what_if(report["what_if"], decision.block_size))
    for name, split_lengths in plan.lengths.items():
        fabric.print(f"lengths in {name}:")
        fabric.print(data_utils.histogram(split_lengths, decision.max_seq_length, decision.block_size))
    estimate = report["batches_estimate"]
    fabric.print(
        f"train batches (estimate): {estimate['efficiency']:.1%} of the tokens real, the rest padding"
        f" (micro_batch_size {estimate['micro_batch_size']}, group_by_length {str(estimate['group_by_length']).lower()})"
    )


def write_report(fabric: L.Fabric, out_dir: Path, report: dict, name: str = run_lock.REPORT) -> None:
    if fabric.global_rank == 0:
        (out_dir / name).write_text(json.dumps(report, indent=2) + "\n")


def key_figures(report: dict) -> dict:
    figures = {"seq/longest": report["longest"], "seq/max_seq_length": report["max_seq_length"]}
    for name, stats in report["splits"].items():
        for key in ("p50", "p99", "max", "over_limit"):
            if stats[key] is not None:
                figures[f"seq/{name}_{key}"] = stats[key]
    return figures


def batches_trained(token_counts: dict, micro_batch_size: int, group_by_length: bool) -> dict:
    """The padding of the whole run, from fit's exact counts (summed over the ranks)."""
    real, processed = (
        token_counts["raw_tokens_plus_prompt_template"],
        token_counts["raw_tokens_plus_prompt_template_and_padding"],
    )
    return {
        "count": token_counts["micro_batches"],
        "real_tokens": real,
        "padded_tokens": processed,
        "efficiency": round(real / processed, 6) if processed else 1.0,
        "micro_batch_size": micro_batch_size,
        "group_by_length": group_by_length,
    }
