"""Resume: what a run needs to go on exactly where it stopped, written so that a kill never leaves a lie on disk.

A resumable checkpoint is two directories, written in this order:

    OUT_DIR/step-000040/          upstream's files, unchanged (lit_model.pth.lora, configs, hyperparameters.yaml, ...)
    OUT_DIR/resume/step-000040/   state.json (what must match before a weight is read) + rank-<r>.pt (tensors)

Each appears only by renaming a finished temporary directory (``OUT_DIR/.tmp-step-000040``), and the state directory
comes last: a checkpoint is *complete* when both exist, state.json names the step directory and its
``lit_model.pth.lora`` still has the recorded sha256. litgpt's own test requires a step directory to hold exactly
upstream's files, which is why the state lives beside it and not in it.

The data order is a pure function of ``(seed, epoch)`` (``random_batches``, or ``data_utils.grouped_batches``), so
the position in an epoch is one number, and skipping ahead hands out index lists only: nothing is read or tokenized.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shlex
import shutil
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from data_utils import UserInputError

FORMAT = 1
STATE_DIR = "resume"
TEMP_PREFIX = ".tmp-"
HEADER = "state.json"
LORA_FILE = "lit_model.pth.lora"

Resume = bool | Literal["auto"] | Path


# ---------------------------------------------------------------------------------------------------------------
# --resume: litgpt's meaning (false | auto | true | a step directory)
# ---------------------------------------------------------------------------------------------------------------


def parse_resume(value: object) -> Resume:
    """``--resume`` as litgpt's ``finetune_full`` takes it: False, True, "auto" or a Path (strings accepted too)."""
    if isinstance(value, (bool, Path)):
        return value
    if value is None:
        return False
    text = str(value).strip()
    lowered = text.lower()
    if lowered in ("false", "no", "0", ""):
        return False
    if lowered in ("true", "yes", "1"):
        return True
    if lowered == "auto":
        return "auto"
    return Path(text)


def find_checkpoint(out_dir: Path, resume: object, log: Callable[[str], None] = print) -> Path | None:
    """The step directory to resume from, or None to start fresh. ``log`` is told which was chosen and what was skipped.

    ``auto``: the newest complete checkpoint in ``out_dir``, None when there is none. ``True``: the same, but none is
    an error. A path: that step directory, which must be complete.
    """
    resume = parse_resume(resume)
    if resume is False:
        return None
    if isinstance(resume, Path):
        problem = incomplete_reason(resume)
        if problem:
            raise UserInputError(f"--resume {resume}: not a checkpoint to resume from: {problem}.")
        log(f"Resuming from {resume} (--resume {resume}).")
        return resume
    for step_dir in step_dirs_newest_first(out_dir):
        problem = incomplete_reason(step_dir)
        if problem is None:
            log(
                f"Resuming from {step_dir}, the newest complete checkpoint in --out_dir {out_dir} (--resume {flag(resume)})."
            )
            return step_dir
        log(f"Skipping {step_dir}: {problem}.")
    if resume == "auto":
        log(f"No complete checkpoint in --out_dir {out_dir}: starting fresh (--resume auto).")
        return None
    raise UserInputError(
        f"--resume true: there is no complete checkpoint in --out_dir {out_dir} to resume from. Use --resume auto to"
        " start fresh when there is none, or --resume false."
    )


def flag(resume: Resume) -> str:
    return str(resume).lower() if isinstance(resume, bool) else str(resume)


def step_dirs_newest_first(out_dir: Path) -> list[Path]:
    found = []
    for path in Path(out_dir).glob("step-*"):
        number = path.name.removeprefix("step-")
        if path.is_dir() and number.isdigit():
            found.append((int(number), path))
    return [path for _, path in sorted(found, reverse=True)]


def state_dir_for(step_dir: Path) -> Path:
    return Path(step_dir).parent / STATE_DIR / Path(step_dir).name


def incomplete_reason(step_dir: Path) -> str | None:
    """None when ``step_dir`` is a complete checkpoint, else what is wrong with it, in words."""
    step_dir = Path(step_dir)
    if not step_dir.is_dir():
        return "no such directory"
    if not (step_dir / LORA_FILE).is_file():
        return f"it has no {LORA_FILE}"
    state_dir = state_dir_for(step_dir)
    try:
        header = json.loads((state_dir / HEADER).read_text())
    except FileNotFoundError:
        return f"no training state at {state_dir / HEADER} (not saved by a resumable run, or it stopped while saving)"
    except (OSError, ValueError) as error:
        return f"its training state {state_dir / HEADER} is unreadable ({error})"
    if header.get("format") != FORMAT or header.get("step_dir") != step_dir.name:
        return f"{state_dir / HEADER} belongs to {header.get('step_dir')!r}, format {header.get('format')!r}"
    missing = [
        f"rank-{rank}.pt" for rank in range(header["world_size"]) if not (state_dir / f"rank-{rank}.pt").is_file()
    ]
    if missing:
        return f"{state_dir} lacks {', '.join(missing)}"
    if file_sha256(step_dir / LORA_FILE) != header["lora_sha256"]:
        return f"its {LORA_FILE} is not the one its training state was saved with (written over since?)"
    return None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Crash-safe writing: a directory appears under its final name only when it is whole
# ---------------------------------------------------------------------------------------------------------------


def temp_path_for(final_path: Path) -> Path:
    return final_path.parent / f"{TEMP_PREFIX}{final_path.name}"


def remove_stale_temporaries(out_dir: Path) -> list[Path]:
    """Deletes what a killed save left behind (``.tmp-*`` in ``out_dir`` and its ``resume/``); returns what it removed.
    Call it on rank 0 before the first save, never while another process writes into ``out_dir``."""
    removed = []
    for folder in (Path(out_dir), Path(out_dir) / STATE_DIR):
        for path in sorted(folder.glob(f"{TEMP_PREFIX}*")) if folder.is_dir() else []:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            removed.append(path)
    return removed


def write_checkpoint_dir_atomically(
    final_path: Path,
    write_fn: Callable[[Path], None],
    is_writer: bool = True,
    barrier: Callable[[], None] = lambda: None,
) -> None:
    """Runs ``write_fn(temporary_dir)``, then renames the temporary directory to ``final_path`` (replacing an older
    one). Killed at any moment, ``final_path`` is either absent, the old one, or the new one whole.

    Several ranks: all call it (``write_fn`` may hold collectives, like ``save_lora_checkpoint``); only the rank with
    ``is_writer`` creates, syncs and renames, so ``write_fn`` must write files on that rank only. ``barrier`` keeps
    the others from touching the temporary directory before it exists or after it is renamed.
    """
    final_path = Path(final_path)
    temporary = temp_path_for(final_path)
    if is_writer:
        if temporary.exists():
            shutil.rmtree(temporary)
        temporary.mkdir(parents=True)
    barrier()
    write_fn(temporary)
    barrier()
    if is_writer:
        for file in temporary.rglob("*"):
            if file.is_file():
                fsync_path(file)
        replace_dir(temporary, final_path)
    barrier()


def replace_dir(source: Path, target: Path) -> None:
    """Moves ``source`` to ``target``; an existing ``target`` is first renamed aside (to a temporary name), then removed."""
    if target.exists():
        aside = target.parent / f"{TEMP_PREFIX}old-{target.name}"
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(target, aside)
        os.replace(source, target)
        shutil.rmtree(aside)
    else:
        os.replace(source, target)
    fsync_path(target.parent)


def fsync_path(path: Path) -> None:
    """Flushes a file or a directory entry to disk, so a machine crash (not only a killed process) keeps the order."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:  # some file systems cannot fsync a directory
        pass
    finally:
        os.close(descriptor)


def save_resumable_checkpoint(
    step_dir: Path,
    write_step_files: Callable[[Path], None],
    header: dict,
    rank_state: dict,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
) -> None:
    """One checkpoint: the old training state of that name is removed first, then the step directory is written
    (``write_step_files``, upstream's files) and last the training state (``header`` from rank 0, ``rank_state``
    from every rank). Every rank calls it."""
    step_dir = Path(step_dir)
    if rank == 0:
        drop_training_state(step_dir)
    write_checkpoint_dir_atomically(step_dir, write_step_files, is_writer=rank == 0, barrier=barrier)
    lora_sha256 = file_sha256(step_dir / LORA_FILE) if rank == 0 else ""
    save_training_state(step_dir, {**header, "lora_sha256": lora_sha256}, rank_state, rank, world_size, barrier)


def forget_training_states(out_dir: Path) -> list[str]:
    """For a run that starts fresh in an ``out_dir`` holding another run's checkpoints: removes their training
    states (their step directories stay usable for generate and merge), so a later ``--resume auto`` cannot pick a
    checkpoint of the old run that is newer than any of this one. Returns the step directory names it made
    non-resumable. Rank 0 only."""
    state_root = Path(out_dir) / STATE_DIR
    forgotten = sorted(path.name for path in state_root.glob("step-*")) if state_root.is_dir() else []
    for name in forgotten:
        drop_training_state(Path(out_dir) / name)
    return forgotten


def drop_training_state(step_dir: Path) -> None:
    """Makes ``step_dir`` incomplete (before it is rewritten): its state directory is renamed aside, then removed."""
    state_dir = state_dir_for(step_dir)
    if state_dir.exists():
        aside = temp_path_for(state_dir)
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(state_dir, aside)
        fsync_path(state_dir.parent)
        shutil.rmtree(aside)


def save_training_state(
    step_dir: Path,
    header: dict,
    rank_state: dict,
    rank: int = 0,
    world_size: int = 1,
    barrier: Callable[[], None] = lambda: None,
) -> None:
    """Writes ``OUT_DIR/resume/<step dir name>/``: each rank its ``rank-<r>.pt``, rank 0 ``state.json`` last, then the
    directory is renamed into place. ``header`` needs ``lora_sha256`` (see ``save_resumable_checkpoint``)."""
    step_dir = Path(step_dir)
    state_dir = state_dir_for(step_dir)
    temporary = temp_path_for(state_dir)
    if rank == 0:
        if temporary.exists():
            shutil.rmtree(temporary)
        temporary.mkdir(parents=True)
    barrier()
    torch.save(rank_state, temporary / f"rank-{rank}.pt")
    fsync_path(temporary / f"rank-{rank}.pt")
    barrier()
    if rank == 0:
        full_header = {"format": FORMAT, "step_dir": step_dir.name, "world_size": world_size, **header}
        (temporary / HEADER).write_text(json.dumps(full_header) + "\n")
        fsync_path(temporary / HEADER)
        replace_dir(temporary, state_dir)
    barrier()


def training_header(
    step: int, iteration: int, batches: EpochBatches, elapsed_seconds: float, run: dict, data: dict, decision: dict
) -> dict:
    """What state.json holds besides its bookkeeping: where the run is, and what must match to go on."""
    progress = {"step": step, "iteration": iteration, **batches.state(), "elapsed_seconds": elapsed_seconds}
    return {"progress": progress, "run": run, "data": data, "decision": decision}


def rank_training_state(optimizer, scheduler, running_loss, token_counts: Mapping[str, torch.Tensor]) -> dict:
    """One rank's tensors: optimizer and scheduler state, its random states, its running-loss window, its token counts."""
    return {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": capture_rng(),
        "running_loss": running_mean_state(running_loss),
        "token_counts": {key: int(value) for key, value in token_counts.items()},
    }


def restore_rank_training_state(
    state: dict, optimizer, scheduler, running_loss, token_counts: Mapping[str, torch.Tensor]
) -> None:
    """Puts ``rank_training_state``'s output back; the random states last, so nothing after draws from them."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    restore_running_mean(running_loss, state["running_loss"])
    for key, value in state["token_counts"].items():
        token_counts[key].fill_(value)
    restore_rng(state["rng"])


def load_lora_weights(model, step_dir: Path, world_size: int = 1) -> None:
    """The checkpoint's exact LoRA tensors (``save_lora_checkpoint`` saves the parameters themselves, in their own
    dtype) into ``model``, after the base weights. Several ranks (FSDP2): a full state dict, sharded on loading."""
    lora = torch.load(Path(step_dir) / LORA_FILE, map_location="cpu", weights_only=True, mmap=True)["model"]
    if world_size == 1:
        missing = set(lora) - set(model.state_dict())
        if missing:
            raise UserInputError(
                f"--resume {step_dir}: its {LORA_FILE} holds {sorted(missing)[:3]}, which this model"
                " lacks: were the --lora_* flags different?"
            )
        model.load_state_dict(lora, strict=False)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    module = getattr(model, "module", model)  # Fabric's wrapper holds the sharded module
    set_model_state_dict(module, lora, options=StateDictOptions(full_state_dict=True, strict=False))


def read_header(step_dir: Path) -> dict:
    """state.json of a checkpoint: progress, run settings, data fingerprint, length decision. Reads no tensor."""
    return json.loads((state_dir_for(step_dir) / HEADER).read_text())


def read_rank_state(step_dir: Path, rank: int = 0, map_location: str | torch.device = "cpu") -> dict:
    return torch.load(state_dir_for(step_dir) / f"rank-{rank}.pt", map_location=map_location, weights_only=True)


# ---------------------------------------------------------------------------------------------------------------
# Same run, same data: compared before any weight is read
# ---------------------------------------------------------------------------------------------------------------


def data_fingerprint(lengths: Mapping[str, Sequence[int]]) -> dict:
    """Per split: the sample count, a sha256 of the token lengths, and the lengths (to say where they differ)."""
    return {
        name: {
            "count": len(values),
            "sha256": hashlib.sha256(json.dumps(list(values)).encode()).hexdigest(),
            "lengths": list(values),
        }
        for name, values in lengths.items()
    }


def decision_record(max_seq_length: int, kept: Mapping[str, Sequence[int]], counts: Mapping[str, int]) -> dict:
    """The length decision as saved: max_seq_length and, per split, the indices left out (kept = all others)."""
    dropped = {name: sorted(set(range(counts[name])) - set(kept[name])) for name in kept}
    return {"max_seq_length": max_seq_length, "dropped": dropped, "counts": dict(counts)}


def kept_from_record(record: dict) -> dict[str, list[int]]:
    """The kept sample indices per split, in dataset order, from ``decision_record``'s output."""
    kept = {}
    for name, dropped in record["dropped"].items():
        left_out = set(dropped)
        kept[name] = [i for i in range(record["counts"][name]) if i not in left_out]
    return kept


def check_same_run(saved: dict, current: dict, checkpoint: str = "the checkpoint") -> None:
    """Raises UserInputError naming every setting (``run``) and every split (``data``) that differs between the
    checkpoint's header and this run. Both are dicts with ``run`` (flag name -> value) and ``data``
    (``data_fingerprint``). A key only one side has is not compared."""
    problems = []
    for name, was in saved.get("run", {}).items():
        if name in current.get("run", {}) and normalized(current["run"][name]) != normalized(was):
            problems.append(f"--{name} was {was!r}, now {current['run'][name]!r}")
    for split, was in saved.get("data", {}).items():
        now = current.get("data", {}).get(split)
        if now is None:
            problems.append(f"the {split} split is missing now ({was['count']} samples then)")
        elif now["count"] != was["count"]:
            problems.append(f"the {split} split had {was['count']} samples, now {now['count']}")
        elif now["sha256"] != was["sha256"]:
            index = next((i for i, (a, b) in enumerate(zip(was["lengths"], now["lengths"])) if a != b), None)
            where = (
                f": {split} sample {index} had {was['lengths'][index]} tokens, now {now['lengths'][index]}"
                if index is not None
                else ""
            )
            problems.append(f"the {split} split has the same count but other token lengths{where}")
    if problems:
        raise UserInputError(
            f"cannot resume from {checkpoint}: this run differs from the one that saved it: "
            + "; ".join(problems)
            + ". Resume with the same data and flags, or start a new run with --resume false (or another --out_dir)."
        )


def normalized(value: object) -> object:
    return json.loads(json.dumps(value, default=str))


def check_same_model(step_dir: Path, checkpoint_dir: Path) -> None:
    """The step directory's model_config.yaml must be the base checkpoint's (a LoRA state fits only its base model)."""
    import yaml

    saved = yaml.safe_load((Path(step_dir) / "model_config.yaml").read_text())
    base = yaml.safe_load((Path(checkpoint_dir) / "model_config.yaml").read_text())
    changed = sorted(key for key in set(saved) | set(base) if saved.get(key) != base.get(key))
    if changed:
        shown = ", ".join(f"{key}: {saved.get(key)!r} there, {base.get(key)!r} here" for key in changed[:5])
        raise UserInputError(
            f"--resume {step_dir}: that checkpoint was trained on another base model than checkpoint_dir"
            f" {checkpoint_dir} ({shown}). Pass the checkpoint_dir it was trained from."
        )


# ---------------------------------------------------------------------------------------------------------------
# Random states and the running loss
# ---------------------------------------------------------------------------------------------------------------


def capture_rng() -> dict:
    """The python, numpy, torch CPU and (when initialized) CUDA random states, as plain values and tensors."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # this rank's device only: no context on the others
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def restore_rng(state: dict) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"], torch.cuda.current_device())


def running_mean_state(metric) -> dict:
    """A torchmetrics ``RunningMean``'s window (its per-slot states) and where its next value goes."""
    return {
        "values": {key: value.detach().cpu().clone() for key, value in metric.metric_state.items()},
        "seen": metric._num_vals_seen,
    }


def restore_running_mean(metric, state: dict) -> None:
    for key, value in state["values"].items():
        setattr(metric, key, value.to(getattr(metric, key).device))
    metric._num_vals_seen = state["seen"]


# ---------------------------------------------------------------------------------------------------------------
# Data order that can be resumed: index lists as a function of (seed, epoch); skipping reads nothing
# ---------------------------------------------------------------------------------------------------------------


def random_batches(
    num_samples: int, micro_batch_size: int, seed: int, epoch: int, rank: int = 0, world_size: int = 1
) -> list[list[int]]:
    """This rank's micro-batches for one epoch of shuffled samples: the order ``DistributedSampler(shuffle=True,
    seed=seed)`` gives after ``set_epoch(epoch)`` (a permutation from ``seed + epoch``, padded by repeating its start to
    a multiple of ``world_size``, every ``world_size``-th index from ``rank``), cut into micro-batches (the last may be
    smaller)."""
    if num_samples == 0:
        return []
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(num_samples, generator=generator).tolist()
    total = math.ceil(num_samples / world_size) * world_size
    order = (order * math.ceil(total / num_samples))[:total]
    mine = order[rank:total:world_size]
    return [mine[i : i + micro_batch_size] for i in range(0, len(mine), micro_batch_size)]


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


# ---------------------------------------------------------------------------------------------------------------
# The flow's side: one object that main builds in section 1 and fit uses to restore and to save
# ---------------------------------------------------------------------------------------------------------------

# --seq.* flags that do not change what is trained (every other, present or future, must match to resume)
SEQ_FLAGS_NOT_RUN_CHANGING = ("dry_run", "scan_workers", "rehearse")


def run_flags(train, seq, seed: int, world_size: int, optimizer, precision, config) -> dict:
    """The flags that change the trained weights, keyed by flag name (so a mismatch reads ``--seed was 1, now 2``)."""
    flags = {
        f"train.{name}": getattr(train, name)
        for name in (
            "micro_batch_size",
            "global_batch_size",
            "max_seq_length",
            "epochs",
            "max_steps",
            "lr_warmup_steps",
        )
    }
    flags.update(seed=seed, devices=world_size, optimizer=optimizer, precision=precision)
    flags.update(
        {f"seq.{name}": value for name, value in asdict(seq).items() if name not in SEQ_FLAGS_NOT_RUN_CHANGING}
    )
    lora = ("lora_r", "lora_alpha", "lora_dropout", "lora_query", "lora_key", "lora_value", "lora_projection")
    flags.update({name: getattr(config, name) for name in (*lora, "lora_mlp", "lora_head")})
    return normalized(flags)


@dataclass
class Resumption:
    """Where this run resumed from (``step_dir`` None: it started fresh) and what its checkpoints record."""

    step_dir: Path | None
    saved: dict | None  # the checkpoint's state.json
    header_parts: dict  # run flags, data fingerprint, length decision: written into every checkpoint of this run

    def report(self) -> dict | None:
        """For seq_lengths.json: ``{"step_dir", "step"}``, or None for a fresh run."""
        if self.step_dir is None:
            return None
        return {"step_dir": str(self.step_dir), "step": self.saved["progress"]["step"]}

    def restore(
        self, fabric, batches: EpochBatches, optimizer, scheduler, running_loss, token_counts
    ) -> tuple[int, int, float]:
        """Puts the checkpoint's training state back (the RNG last: nothing may draw between this and the loop) and
        moves ``batches`` to where it stopped. Returns (step, iteration, seconds trained before)."""
        progress = self.saved["progress"]
        batches.seek(progress["epoch"], progress["position"])
        state = read_rank_state(self.step_dir, fabric.global_rank)
        restore_rank_training_state(state, optimizer, scheduler, running_loss, token_counts)
        fabric.print(
            f"Resumed at step {progress['step']} (epoch {progress['epoch'] + 1}, {progress['position']} micro-batches"
            f" in; none re-read) from {self.step_dir}"
        )
        fabric.log_dict({"resumed_from_step": progress["step"]}, step=progress["iteration"])
        return progress["step"], progress["iteration"], progress["elapsed_seconds"]

    def save(
        self,
        fabric,
        step_dir: Path,
        write_step_files: Callable[[Path], None],
        *,
        step: int,
        iteration: int,
        batches: EpochBatches,
        elapsed_seconds: float,
        optimizer,
        scheduler,
        running_loss,
        token_counts,
    ) -> None:
        """A crash-safe, resumable checkpoint: upstream's files in ``step_dir``, the training state beside it."""
        header = training_header(step, iteration, batches, elapsed_seconds, **self.header_parts)
        state = rank_training_state(optimizer, scheduler, running_loss, token_counts)
        save_resumable_checkpoint(
            step_dir, write_step_files, header, state, fabric.global_rank, fabric.world_size, fabric.barrier
        )


def begin(fabric, out_dir: Path, step_dir: Path | None, plan, run: dict, saves: bool):
    """After the scan, before any weight: checks this run against the checkpoint (``step_dir``; None for a fresh
    run), takes the length decision from it, and tidies ``out_dir`` (what a killed save left; a fresh run that
    ``saves`` (any run that trains: a signal makes it save) makes an old run's checkpoints non-resumable). ``plan`` is a ``seq_data.LengthPlan``. Returns (Resumption, plan)."""
    data = data_fingerprint({name: plan.lengths[name] for name in ("train", "val")})
    saved = None
    if step_dir is not None:
        saved = read_header(step_dir)
        check_same_run(saved, {"run": run, "data": data}, str(step_dir))
        plan = plan_as_saved(fabric, plan, saved["decision"])
    if fabric.global_rank == 0:
        for path in remove_stale_temporaries(out_dir):
            fabric.print(f"Removed {path}: left by a save that did not finish.")
        forgotten = forget_training_states(out_dir) if step_dir is None and saves else []
        if forgotten:
            fabric.print(
                f"Starting fresh (--resume false) in --out_dir {out_dir}: {', '.join(forgotten)} of an earlier run are"
                " no longer resumable (their weights stay)."
            )
    fabric.barrier()
    counts = {name: len(plan.lengths[name]) for name in plan.kept}
    decision = decision_record(plan.decision.max_seq_length, plan.kept, counts)
    return Resumption(step_dir, saved, {"run": run, "data": data, "decision": decision}), plan


def plan_as_saved(fabric, plan, record: dict):
    """The plan, checked against the checkpoint's length decision (max_seq_length, kept samples). With the same data
    and flags (checked before) they agree unless another version of this code decides differently; then the run
    cannot go on exactly, and stops before any weight is read."""
    kept = kept_from_record(record)
    if record["max_seq_length"] == plan.decision.max_seq_length and kept == plan.kept:
        return plan
    changed = [
        f"split {name}: {len(kept[name])} samples kept then, {len(plan.kept[name])} now"
        for name in kept
        if kept[name] != plan.kept.get(name)
    ]
    raise UserInputError(
        f"cannot resume: the checkpoint trained with max_seq_length {record['max_seq_length']}, this run decides"
        f" {plan.decision.max_seq_length} from the same data and flags{(' (' + '; '.join(changed) + ')') if changed else ''}"
        " (was finetune_lora.py updated in between?). Resume with the version that saved it, or start a new run."
    )


# ---------------------------------------------------------------------------------------------------------------
# Graceful stop on SIGTERM / SIGINT
# ---------------------------------------------------------------------------------------------------------------


class GracefulStop:
    """Within ``with GracefulStop() as stop:`` the first SIGTERM or SIGINT only sets ``stop.requested`` (the loop
    finishes its optimizer step, saves and leaves with ``stop.exit_code``: 143 or 130); a second SIGINT raises
    KeyboardInterrupt at once. The previous handlers come back on exit. Main thread only (Python's rule for signals)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(
        self, log: Callable[[str], None] = lambda message: print(message, file=sys.stderr, flush=True)
    ) -> None:
        self.log = log
        self.signal_number: int | None = None
        self.checkpoint: Path | None = None  # set by the loop when it saved and left early
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    @property
    def exit_code(self) -> int:
        return 128 + self.signal_number if self.signal_number is not None else 0

    def __enter__(self) -> GracefulStop:
        for number in self.SIGNALS:
            self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame) -> None:
        name = signal.Signals(number).name
        if self.signal_number is None:
            self.signal_number = number
            self.log(
                f"{name} received: stopping after this optimizer step, with a checkpoint. Ctrl-C again to stop at once."
            )
        elif number == signal.SIGINT:
            raise KeyboardInterrupt
        else:
            self.log(f"{name} received again: already stopping after this optimizer step.")

    def leave(self, fabric) -> None:
        """Ends the process after a stop with a checkpoint: the same last line on stderr as a stop at once
        (``interrupted (Ctrl-C)`` / ``terminated (SIGTERM)``, rank 0), and exit 130 / 143."""
        if fabric.global_rank == 0:
            line = "interrupted (Ctrl-C)" if self.signal_number == signal.SIGINT else "terminated (SIGTERM)"
            print(line, file=sys.stderr, flush=True)
        sys.exit(self.exit_code)

    def requested_on_any_rank(self, fabric) -> bool:
        """True on every rank when any rank was signalled, so all ranks stop at the same step (a collective)."""
        if fabric.world_size == 1:
            return self.requested
        flag_tensor = torch.tensor(int(self.requested), device=fabric.device)
        return bool(fabric.all_reduce(flag_tensor, reduce_op="sum").item())


def resume_command(argv: Sequence[str], step_dir: Path, python: str = "python") -> str:
    """The command line that continues this run from ``step_dir``: ``argv`` with any --resume replaced."""
    kept, skip_next = [], False
    for argument in argv:
        if skip_next:
            skip_next = False
        elif argument == "--resume":
            skip_next = True
        elif not argument.startswith("--resume="):
            kept.append(argument)
    return shlex.join([python, *kept, "--resume", str(step_dir)])
