"""Length work on Fabric: load the splits, scan them across ranks, decide, build the loaders the plan allows, report.

``data_utils`` holds the logic over plain values; this module connects it to litgpt's data modules, to torch's
DataLoader and to the ranks of a Fabric run. Nothing here builds a model or reads a weight.
"""

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.core.hooks import DataHooks
from litgpt.args import TrainArgs
from litgpt.data import DataModule
from litgpt.tokenizer import Tokenizer
from torch.utils.data import DataLoader, RandomSampler, Subset

import cli_support
import data_utils
import input_checks
import packing
import resume_state
import run_lock
import truncation
from data_utils import Decision, SampleParts, UserInputError
from seq_args import SeqArgs


@dataclass
class LengthPlan:
    """What the scan found and what was decided, settled before the model exists."""

    decision: Decision
    parts: dict[str, list[SampleParts]]  # every sample's prompt and response lengths, per split, in dataset order
    cuts: dict[str, list[truncation.Plan]]  # how every sample is cut to max_seq_length (a no-op when it fits)
    kept: dict[str, list[int]]  # the indices each split keeps (--seq.over_length, then the learning signal), in order
    dropped: dict[str, dict[int, str]]  # per split, the indices left out and why: "over_length" or "unsupervised"
    loaders: dict[str, DataLoader]  # the data module's untruncated loaders, which were scanned

    @property
    def lengths(self) -> dict[str, list[int]]:
        """Every sample's untruncated length, per split, in dataset order."""
        return {split: [p.length for p in parts] for split, parts in self.parts.items()}

    warnings: list[dict] = field(default_factory=list)  # outcomes that train on little or nothing (input_checks)
    located: input_checks.DataFiles | None = None  # where each sample sits in the user's files (JSON module only)

    def where(self, split: str, index: int) -> str | None:
        """A sample's place in the user's file ("position 10 of /data/all.json"), or None when unknown."""
        return self.located.where(split, index) if self.located else None

    def kept_lengths(self, split: str) -> list[int]:
        """The lengths of the kept samples as cut, in the order the loaders see them."""
        return [self.cuts[split][i].length for i in self.kept[split]]

    def dropped_rows(self) -> list[tuple[str, int, int, str, object]]:
        """(split, index, length, reason, sample) of every sample left out, for dropped_samples.jsonl."""
        rows = []
        for split, reasons in self.dropped.items():
            samples = getattr(self.loaders[split].dataset, "data", None)
            for i in sorted(reasons):
                sample = samples[i] if samples is not None else None
                rows.append((split, i, self.parts[split][i].length, reasons[i], sample))
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
    """Scan every split untruncated, decide max_seq_length, apply the over-length policy, plan each sample's cut and
    leave out the samples that the cut leaves with no token to learn from; then find what would train on little or
    nothing (``plan.warnings``). ``located`` (from ``input_checks.check_data_files``) names samples by their place in
    the user's files, in errors, warnings and dropped_samples.jsonl."""
    loaders = load_splits(fabric, data, tokenizer, train.micro_batch_size, max_seq_length=None)
    workers = seq.scan_workers if seq.scan_workers is not None else max(1, getattr(data, "num_workers", 1))
    parts = {name: scan_split(fabric, loader.dataset, name, workers) for name, loader in loaders.items()}
    lengths = {name: [p.length for p in split_parts] for name, split_parts in parts.items()}
    decision = data_utils.decide_max_seq_length(lengths, block_size, seq.headroom, train.max_seq_length)
    where = located.where if located else None
    within_policy = data_utils.apply_over_length(lengths, decision, seq.over_length, where=where)
    cuts = {name: truncation.plan_split(parts[name], decision.max_seq_length, seq.truncate_from) for name in parts}
    kept, dropped = {}, {}
    for name, loader in loaders.items():
        kept[name], without_target = truncation.drop_unsupervised(
            within_policy[name], cuts[name], truncation.masks_prompt(loader.dataset)
        )
        dropped[name] = dict.fromkeys(sorted(set(range(len(parts[name]))) - set(within_policy[name])), "over_length")
        dropped[name].update(dict.fromkeys(without_target, "unsupervised"))
    check_learning_signal(kept, dropped, decision, seq, where)
    plan = LengthPlan(decision, parts, cuts, kept, dropped, loaders, located=located)
    plan.warnings = input_checks.plan_warnings(plan, data, tokenizer, seq.over_length, where=where)
    return plan


def check_learning_signal(
    kept: dict[str, list[int]], dropped: dict[str, dict[int, str]], decision: Decision, seq: SeqArgs, where=None
) -> None:
    """Train and val must keep a sample with a token to learn from (--seq.over_length drop checked its own case)."""
    for split in ("train", "val"):
        if kept[split]:
            continue
        unsupervised = [i for i, reason in dropped[split].items() if reason == "unsupervised"]
        shown = ", ".join(f"{split}[{i}]" + (f" ({where(split, i)})" if where else "") for i in unsupervised[:5]) + (
            " ..." if len(unsupervised) > 5 else ""
        )
        hint = " --seq.truncate_from prompt," if seq.truncate_from == "end" else ""
        raise UserInputError(
            f"Every remaining {split} sample ({len(unsupervised)}: {shown}) has no token to learn from once cut to"
            f" max_seq_length {decision.max_seq_length} (all its labels are ignored: with a masked prompt, no response"
            f" token is left). Raise --train.max_seq_length (up to the block_size {decision.block_size}), or use{hint}"
            " --data.mask_prompt false, or shorten these samples."
        )


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


def scan_split(fabric: L.Fabric, dataset, split: str, workers: int) -> list[SampleParts]:
    """Every sample's parts. Each rank scans its own contiguous share; the shares are gathered in order."""
    share = math.ceil(len(dataset) / fabric.world_size)
    start = min(len(dataset), fabric.global_rank * share)
    stop = min(len(dataset), start + share)
    problem = None
    try:
        mine = data_utils.scan_parts(dataset, split, start, stop, workers, progress=fabric.global_rank == 0)
    except UserInputError as error:
        mine, problem = [], error
    cli_support.agree_on_error(fabric, problem)  # every rank raises the failing rank's message; rank 0 prints it
    if fabric.world_size == 1:
        return mine
    width = len(SampleParts._fields)  # one row of counts per sample; -1 rows pad a short share
    padded = torch.full((share, width), -1, dtype=torch.long, device=fabric.device)
    if mine:
        padded[: len(mine)] = torch.tensor(mine, dtype=torch.long)
    gathered = fabric.all_gather(padded).cpu()
    return [SampleParts(*row) for row in gathered.reshape(-1, width).tolist() if row[0] >= 0]


# ---------------------------------------------------------------------------------------------------------------
# The loaders the plan allows
# ---------------------------------------------------------------------------------------------------------------


def make_loaders(
    fabric: L.Fabric, plan: LengthPlan, micro_batch_size: int, group_by_length: bool, seed: int, pack: bool = False
) -> tuple[DataLoader, DataLoader]:
    """Train and val loaders, set up by Fabric: the scanned loaders over only the kept samples, each cut as planned.
    Under ``pack`` the train loader gives packed micro-batches (``micro_batch_size`` rows each); validation is never
    packed. The train order is a function of the epoch (``train_batches``), so a run can resume at any micro-batch."""
    train_loader, val_loader = (
        keep_samples(plan.loaders[name], plan.kept[name], plan.cuts[name]) for name in ("train", "val")
    )
    if pack:  # items are rows of samples, collated packed (ignoring -100, as the loss does)
        rows = packing.PackedRows(train_loader.dataset)
        train_loader = DataLoader(rows, num_workers=train_loader.num_workers, collate_fn=packing.packed_collate)
    order = train_batches(plan, micro_batch_size, group_by_length, pack, seed, fabric.global_rank, fabric.world_size)
    train_loader = resume_state.resumable_loader(train_loader, resume_state.ResumableBatchSampler(order), seed)
    train_loader = fabric.setup_dataloaders(train_loader, use_distributed_sampler=False)  # the order splits by rank
    return train_loader, fabric.setup_dataloaders(val_loader)


def train_batches(
    plan: LengthPlan, micro_batch_size: int, group_by_length: bool, pack: bool, seed: int, rank: int, world_size: int
) -> Callable[[int], list[list]]:
    """This rank's train micro-batches (kept-sample indices; under ``pack`` rows of them) as a function of the epoch,
    so a run can resume at any micro-batch without reading the ones before: packed, grouped by length, or shuffled
    as DistributedSampler does."""
    lengths = plan.kept_lengths("train")
    placement = {"rank": rank, "world_size": world_size}
    if pack:
        return packing.packed_plan(lengths, plan.decision.max_seq_length, micro_batch_size, seed, **placement)
    if group_by_length:
        return partial(data_utils.grouped_batches, lengths, micro_batch_size, seed, **placement)
    return partial(resume_state.random_batches, len(lengths), micro_batch_size, seed, **placement)


def packed_micro_batches(fabric: L.Fabric, plan: LengthPlan, micro_batch_size: int, seed: int) -> int:
    """This rank's packed train micro-batches in the first epoch: the length of ``packed_loader``, before it exists."""
    batches_for_epoch = packing.packed_plan(
        plan.kept_lengths("train"),
        plan.decision.max_seq_length,
        micro_batch_size,
        seed,
        rank=fabric.global_rank,
        world_size=fabric.world_size,
    )
    return len(batches_for_epoch(0))


def keep_samples(loader: DataLoader, indices: list[int], cuts: list[truncation.Plan]) -> DataLoader:
    """The same loader over only ``indices`` of its untruncated dataset, each sample cut by its plan in ``cuts``
    (the loader itself when all are kept and none is cut). Its collate_fn, built for no max_seq_length, cuts nothing."""
    truncated = any(cuts[i].truncated for i in indices)
    if len(indices) == len(loader.dataset) and not truncated:
        return loader
    dataset = truncation.TruncatedSFT(loader.dataset, cuts) if truncated else loader.dataset
    shuffle = isinstance(loader.sampler, RandomSampler)
    return DataLoader(
        Subset(dataset, indices),
        batch_size=loader.batch_size,
        shuffle=shuffle,
        generator=loader.generator if shuffle else None,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
    )


class GroupedBatchSampler(resume_state.ResumableBatchSampler):
    """Batch sampler for --seq.group_by_length: ``data_utils.grouped_batches`` of this rank, a new epoch per pass."""

    def __init__(
        self, lengths: list[int], micro_batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        batches = partial(data_utils.grouped_batches, lengths, micro_batch_size, seed, rank=rank, world_size=world_size)
        super().__init__(batches)


# ---------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------


def publish_plan(
    fabric: L.Fabric, out_dir: Path, plan: LengthPlan, seq: SeqArgs, micro_batch_size: int, seed: int
) -> dict:
    """Print the decision and the warnings, write seq_lengths.json (and dropped_samples.jsonl, under drop or when a
    sample has no target), log the key figures. Files an earlier run left that this run does not rewrite are removed
    first; a dry run into an out_dir with a trained run writes its own files beside it (``run_lock.report_files``)."""
    decision = plan.decision
    if decision.capped and decision.source == "override":
        fabric.print(
            f"warning: --train.max_seq_length {decision.wanted} is above the model's block_size {decision.block_size}; using {decision.block_size}."
        )
    report = build_report(plan, seq)
    expected = packing.expected_efficiency(
        plan.kept_lengths("train"), decision.max_seq_length, micro_batch_size, seed, fabric.world_size
    )
    report["expected_efficiency"] = {how: estimate["efficiency"] for how, estimate in expected.items()}
    chosen = "packed" if seq.pack else "grouped" if seq.group_by_length else "random"
    report["batches_estimate"] = {"packed": False, **expected[chosen]}
    report["batches_estimate"].update(micro_batch_size=micro_batch_size, group_by_length=seq.group_by_length)
    report["warnings"] = plan.warnings
    report["dry_run"] = seq.dry_run
    if fabric.global_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        dropped = plan.dropped_rows()
        files = run_lock.report_files(out_dir, dry_run=seq.dry_run, drop=seq.over_length == "drop" or bool(dropped))
        if files.dropped is not None:
            source = plan.located.source if plan.located else None
            data_utils.write_dropped(files.dropped, dropped, source=source)
        print_report(fabric, report, plan)
        for line in input_checks.warning_lines(plan.warnings):
            fabric.print(line)
        if files.note:
            fabric.print(files.note)
        write_report(fabric, out_dir, report, name=files.report.name)
    fabric.log_dict(key_figures(report), step=0)
    return report


TRUNCATION_KEYS = (
    "truncated",
    "prompt_tokens_cut",
    "response_tokens_cut",
    "responses_cut",
    "eos_lost",
    "unsupervised_dropped",
)


def build_report(plan: LengthPlan, seq: SeqArgs) -> dict:
    decision = plan.decision
    splits = {}
    for name, split_lengths in plan.lengths.items():
        splits[name] = data_utils.split_stats(split_lengths, decision.max_seq_length)
        reasons = list(plan.dropped[name].values())
        if seq.over_length == "drop":
            splits[name]["dropped"] = reasons.count("over_length")
            splits[name]["tokens_truncated"] = 0
        seen = [plan.cuts[name][i] for i in plan.kept[name]]
        splits[name].update(truncation.truncation_stats(seen, reasons.count("unsupervised")))
    every_length = [n for split_lengths in plan.lengths.values() for n in split_lengths]
    every_parts = [p for split_parts in plan.parts.values() for p in split_parts]
    what_if = data_utils.what_if(every_length, decision.block_size, chosen=decision.max_seq_length)
    return {
        "max_seq_length": decision.max_seq_length,
        "source": decision.source,
        "longest": decision.longest,
        "longest_split": decision.longest_split,
        "headroom": decision.headroom,
        "block_size": decision.block_size,
        "capped": decision.capped,
        "over_length": seq.over_length,
        "truncate_from": seq.truncate_from,
        "summary": decision.summary(),
        "splits": splits,
        "what_if": truncation.add_response_cut(what_if, every_parts, seq.truncate_from),
    }


def print_report(fabric: L.Fabric, report: dict, plan: LengthPlan) -> None:
    decision = plan.decision
    fabric.print(decision.summary())
    columns = ("count", "min", "mean", "p50", "p90", "p99", "max", "argmax", "over_limit", "tokens_truncated")
    extra = ("dropped",) if report["over_length"] == "drop" else ()
    print_table(fabric, report["splits"], columns + extra)
    fabric.print(f"cut samples (--seq.truncate_from {report['truncate_from']}):")
    print_table(fabric, report["splits"], TRUNCATION_KEYS)
    fabric.print(data_utils.format_what_if(report["what_if"], decision.block_size))
    for name, split_lengths in plan.lengths.items():
        fabric.print(f"lengths in {name}:")
        fabric.print(data_utils.histogram(split_lengths, decision.max_seq_length, decision.block_size))
    estimate = report["batches_estimate"]
    how = (
        f"packed, {estimate['samples_per_row']:g} samples per row"
        if estimate["packed"]
        else f"group_by_length {str(estimate['group_by_length']).lower()}"
    )
    fabric.print(
        f"train batches (estimate): {estimate['efficiency']:.1%} of the tokens real, the rest padding"
        f" (micro_batch_size {estimate['micro_batch_size']}, {how})"
    )
    expected = ", ".join(f"{how} {efficiency:.1%}" for how, efficiency in report["expected_efficiency"].items())
    fabric.print(
        f"expected share of real tokens in train batches (epoch 1, micro_batch_size {estimate['micro_batch_size']},"
        f" max_seq_length {decision.max_seq_length}): {expected} (--seq.group_by_length, --seq.pack)"
    )


def print_table(fabric: L.Fabric, splits: dict, columns: tuple[str, ...]) -> None:
    widths = [max(10, len(c)) for c in columns]
    fabric.print("  split  " + " ".join(f"{c:>{w}}" for c, w in zip(columns, widths)))
    for name, stats in splits.items():
        cells = ("-" if stats.get(c) is None else stats[c] for c in columns)
        fabric.print(f"  {name:<6} " + " ".join(f"{cell:>{w}}" for cell, w in zip(cells, widths)))


def write_report(fabric: L.Fabric, out_dir: Path, report: dict, name: str = run_lock.REPORT) -> None:
    if fabric.global_rank == 0:
        (out_dir / name).write_text(json.dumps(report, indent=2) + "\n")


def key_figures(report: dict) -> dict:
    figures = {"seq/longest": report["longest"], "seq/max_seq_length": report["max_seq_length"]}
    for name, stats in report["splits"].items():
        for key in ("p50", "p99", "max", "over_limit", "response_tokens_cut", "unsupervised_dropped"):
            if stats[key] is not None:
                figures[f"seq/{name}_{key}"] = stats[key]
    return figures


def batches_trained(token_counts: dict, micro_batch_size: int, group_by_length: bool, pack: bool = False) -> dict:
    """The padding of the whole run, from fit's exact counts (summed over the ranks). A row is one sample unpacked."""
    real, processed = (
        token_counts["raw_tokens_plus_prompt_template"],
        token_counts["raw_tokens_plus_prompt_template_and_padding"],
    )
    rows, samples = token_counts["rows"], token_counts["samples"]
    return {
        "count": token_counts["micro_batches"],
        "packed": pack,
        "rows": rows,
        "samples": samples,
        "samples_per_row": round(samples / rows, 3) if rows else 0.0,
        "real_tokens": real,
        "padded_tokens": processed,
        "efficiency": round(real / processed, 6) if processed else 1.0,
        "micro_batch_size": micro_batch_size,
        "group_by_length": group_by_length,
    }
