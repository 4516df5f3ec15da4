"""The length plan: load the splits, scan them, decide max_seq_length, apply the over-length policy, plan the cuts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
from lightning.pytorch.core.hooks import DataHooks
from litgpt.args import TrainArgs
from litgpt.data import DataModule
from litgpt.tokenizer import Tokenizer
from torch.utils.data import DataLoader, Dataset

import data_utils
from data_utils import Decision, SampleParts
from litgpt_seqlen import ranks
from litgpt_seqlen.args import SeqArgs
from litgpt_seqlen.data import files, truncation
from litgpt_seqlen.data.scan import scan_split
from litgpt_seqlen.errors import UserInputError


@dataclass
class LengthPlan:
    """What the scan found and what was decided, settled before the model exists."""

    decision: Decision
    parts: dict[str, list[SampleParts]]  # every sample's prompt and response lengths, per split, in dataset order
    cuts: dict[str, list[truncation.Plan]]  # how every sample is cut to max_seq_length (a no-op when it fits)
    kept: dict[str, list[int]]  # the indices each split keeps (--seq.over_length, then the learning signal), in order
    dropped: dict[str, dict[int, str]]  # per split, the indices left out and why: "over_length" or "unsupervised"
    datasets: dict[str, Dataset]  # the data module's untruncated datasets, which were scanned (indices are theirs)

    @property
    def lengths(self) -> dict[str, list[int]]:
        """Every sample's untruncated length, per split, in dataset order."""
        return {split: [p.length for p in parts] for split, parts in self.parts.items()}

    located: files.DataFiles | None = None  # where each sample sits in the user's files (JSON module only)

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
            samples = getattr(self.datasets[split], "data", None)
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
    located: files.DataFiles | None = None,
) -> LengthPlan:
    """Scan every split untruncated, decide max_seq_length, apply the over-length policy, plan each sample's cut and
    leave out the samples that the cut leaves with no token to learn from. ``located`` (from ``files.check_data_files``) names samples by their place in
    the user's files, in errors, warnings and dropped_samples.jsonl."""
    loaders = load_splits(fabric, data, tokenizer, train.micro_batch_size, max_seq_length=None)
    workers = seq.scan_workers if seq.scan_workers is not None else max(1, getattr(data, "num_workers", 1))
    parts = {name: scan_split(fabric, loader.dataset, name, workers) for name, loader in loaders.items()}
    lengths = {name: [p.length for p in split_parts] for name, split_parts in parts.items()}
    decision = data_utils.decide_max_seq_length(lengths, block_size, seq.headroom, train.max_seq_length)
    where = located.where if located else None
    try:
        within_policy = data_utils.apply_over_length(lengths, decision, seq.over_length, where=where)
    except data_utils.LengthError as problem:
        raise UserInputError(str(problem)) from None
    cuts = {name: truncation.plan_split(parts[name], decision.max_seq_length, seq.truncate_from) for name in parts}
    kept, dropped = {}, {}
    for name, loader in loaders.items():
        kept[name], without_target = truncation.drop_unsupervised(
            within_policy[name], cuts[name], truncation.masks_prompt(loader.dataset)
        )
        dropped[name] = dict.fromkeys(sorted(set(range(len(parts[name]))) - set(within_policy[name])), "over_length")
        dropped[name].update(dict.fromkeys(without_target, "unsupervised"))
    check_learning_signal(kept, dropped, decision, seq, where)
    datasets = {name: loader.dataset for name, loader in loaders.items()}
    return LengthPlan(decision, parts, cuts, kept, dropped, datasets, located=located)


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
    problem = None
    with fabric.rank_zero_first():
        try:
            data.prepare_data()
        except OSError as error:  # no network (requests' errors are OSErrors), or download_dir cannot be written
            problem = preparation_error(data, error)
    ranks.agree_on_error(fabric, problem)  # rank 0 prints it, every rank stops
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


def preparation_error(data: DataModule, error: OSError) -> UserInputError:
    """What ``prepare_data`` could not do: write its download directory (an error naming a file), or download."""
    reason = " ".join(str(error).split())[:300] or type(error).__name__
    if getattr(error, "filename", None) is not None:
        return UserInputError(
            f"{describe(data)} could not prepare its data: {reason}. Choose a writable --data.download_dir, or use"
            " --data JSON --data.json_path with local files."
        )
    url = getattr(data, "file_url", None) or getattr(data, "repo_id", None)
    source = f" from {url}" if url else ""
    file_name, download_dir = getattr(data, "file_name", None), getattr(data, "download_dir", None)
    place = (
        f" or put the file at {Path(download_dir) / file_name} (read from there without a download),"
        if file_name
        else ""
    )
    return UserInputError(
        f"{describe(data)} could not download its data{source} ({type(error).__name__}: {reason})."
        f" Check the network connection,{place} or train on local files with --data JSON --data.json_path FILE"
        " (.json or .jsonl; no network needed)."
    )


def describe(data: DataModule) -> str:
    """The data module as a user named it: its class and its file (the repr prints prompt-style objects)."""
    path = getattr(data, "json_path", None) or getattr(data, "download_dir", None)
    return f"{type(data).__name__}({path})" if path is not None else type(data).__name__
