"""The training state: one dict, saved with ``fabric.save`` and put back with ``fabric.load``, crash-safe.

``new_state`` is the dict ``fit`` works on: model, optimizer, scheduler, where the run is (step, iteration, epoch,
position in the epoch, seconds trained) and this rank's token counts, running loss and random states. A checkpoint
writes upstream's step directory first, then ``resume/<step>/`` (``layout``); each appears only by renaming a finished
temporary directory, so a kill at any moment leaves the old checkpoint, none, or the new one whole.

Under several ranks the per-rank parts are gathered into one list (``ranks``), so the file holds every rank's.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from litgpt_seqlen import ranks
from litgpt_seqlen.checkpoint.atomic import checkpoint_writes, drop_training_state, write_checkpoint_dir_atomically
from litgpt_seqlen.checkpoint.layout import (
    FORMAT,
    HEADER,
    STATE_FILE,
    file_sha256,
    files_sha256,
    state_dir_for,
)
from litgpt_seqlen.errors import UserInputError
from litgpt_seqlen.methods.base import nothing_to_finish
from litgpt_seqlen.model.sharded import load_full_weights
from litgpt_seqlen.training.loss import RunningLoss
from litgpt_seqlen.training.rng import capture_rng

# how long the run goes on: may change on resume (the steps already taken stay what they were)
RUN_LENGTH_FLAGS = ("train.epochs", "train.max_steps")
PROGRESS = ("step", "iteration", "epoch", "position", "elapsed_seconds", "micro_batch_size")  # size: 0 = the flag's
TOKEN_COUNTS = (  # litgpt's names (create_finetuning_performance_report), plus packed rows and samples
    "raw_tokens",
    "raw_tokens_plus_prompt_template",
    "raw_tokens_plus_prompt_template_and_padding",
    "rows",
    "samples",
)


def new_state(model, optimizer, scheduler, accumulation: int, device: torch.device) -> dict:
    """What fit updates and a checkpoint holds; ``rng`` is set only when a checkpoint was loaded (restored last)."""
    return {
        "model": model,
        "optimizer": optimizer,
        "scheduler": scheduler,
        **dict.fromkeys(PROGRESS, 0),
        "token_counts": {key: torch.tensor(0, device=device, dtype=torch.long) for key in TOKEN_COUNTS},
        "running_loss": RunningLoss(window=accumulation, device=device),
        "rng": None,
    }


def save(
    fabric, step_dir: Path, state: dict, write_step_files, header_parts: dict, weights_file: str, trainable, agree=None
) -> None:
    """A resumable checkpoint: ``write_step_files(directory)`` writes upstream's files into ``step_dir`` (the trained
    weights in ``weights_file``), then the training state is written beside it, with the model's ``trainable``
    parameters only, and a header (``header_parts``: run flags, data fingerprint, decision) that records the sha256 of
    every file. Every rank calls it. Out of space, every rank raises: the ``OutOfSpace`` rank 0 met, or what ``agree``
    (``atomic.write_checkpoint_dir_atomically``'s) makes of it."""
    step_dir = Path(step_dir)
    writer = fabric.global_rank == 0
    agree = agree or (lambda problem: ranks.agree_on_error(fabric, problem))
    with checkpoint_writes(fabric):  # every file beside its destination; a full disk raises OSError(ENOSPC)
        if writer:
            drop_training_state(step_dir)  # the step directory is about to change: its old state no longer matches
        write_checkpoint_dir_atomically(step_dir, write_step_files, is_writer=writer, agree=agree)
        mine = {
            "rng": capture_rng(),
            "running_loss": state["running_loss"].state_dict(),
            "token_counts": {key: int(value) for key, value in state["token_counts"].items()},
        }
        saved = {key: state[key] for key in ("model", "optimizer", "scheduler", *PROGRESS)}
        saved["ranks"] = gather_from_ranks(fabric, mine)

        def write_state(directory: Path) -> None:
            fabric.save(directory / STATE_FILE, saved, filter={"model": trainable})
            if writer:
                header = {
                    "format": FORMAT,
                    "step_dir": step_dir.name,
                    "world_size": fabric.world_size,
                    "progress": {key: state[key] for key in PROGRESS},
                    **header_parts,
                    "weights": {"file": weights_file, "sha256": file_sha256(step_dir / weights_file)},
                    "files": files_sha256(directory),
                }
                (directory / HEADER).write_text(json.dumps(header) + "\n")

        write_checkpoint_dir_atomically(state_dir_for(step_dir), write_state, is_writer=writer, agree=agree)


def load(fabric, step_dir: Path, state: dict) -> None:
    """Puts a checkpoint's training state into ``state``: the trained weights, optimizer and scheduler in place, the
    progress and this rank's counts and running loss as values, its random states in ``state["rng"]`` (for fit to
    restore last, when nothing else draws before the loop)."""
    loaded = {key: state[key] for key in ("model", "optimizer", "scheduler", *PROGRESS)}
    loaded["ranks"] = None
    path = state_dir_for(step_dir) / STATE_FILE
    fabric.load(path, loaded, strict=False)  # strict=False: the base weights are not in it
    if fabric.world_size > 1:  # Lightning puts a sharded model's weights back one parameter at a time, not exactly
        load_full_weights(state["model"], torch.load(path, map_location="cpu", weights_only=True, mmap=True)["model"])
    mine = loaded["ranks"][fabric.global_rank]
    state.update({key: loaded[key] for key in PROGRESS})
    for key, value in mine["token_counts"].items():
        state["token_counts"][key].fill_(value)
    state["running_loss"].load_state_dict(mine["running_loss"])
    state["rng"] = mine["rng"]


def gather_from_ranks(fabric, mine: dict) -> list[dict]:
    """Every rank's ``mine``, in rank order, on every rank."""
    if fabric.world_size == 1:
        return [mine]
    everyone: list = [None] * fabric.world_size
    torch.distributed.all_gather_object(everyone, mine)
    return everyone


@dataclass
class Resumption:
    """Where this run resumed from (``step_dir`` None: it started fresh) and what its checkpoints record."""

    step_dir: Path | None
    saved: dict | None  # the checkpoint's state.json
    header_parts: dict  # run flags, data fingerprint, length decision: written into every checkpoint of this run

    def length_changed(self) -> list[str]:
        """The run-length flags (``--train.epochs``, ``--train.max_steps``) this run sets otherwise than the
        checkpoint's, as ``--flag was A, now B``; empty for a fresh run or the same length."""
        if self.saved is None:
            return []
        was, run = self.saved["run"], self.header_parts["run"]
        return [
            f"--{name} was {was.get(name)}, now {run[name]}" for name in RUN_LENGTH_FLAGS if was.get(name) != run[name]
        ]

    def check_run_length(self, total: int, log) -> None:
        """A resumed run may go on for more steps than it was planned with (``--train.max_steps`` or
        ``--train.epochs`` raised); ``log`` says what that changes. Fewer steps than the checkpoint took: refused."""
        changed = self.length_changed()
        if not changed:
            return
        step = self.saved["progress"]["step"]
        if total < step:
            raise UserInputError(
                f"cannot resume from {self.step_dir}: {'; '.join(changed)}, which makes a run of {total} optimizer"
                f" steps, but the checkpoint is at step {step}. Go on from an earlier step-* directory (--resume"
                " PATH), or give a length of at least that many steps."
            )
        log(
            f"{'; '.join(changed)}: the run goes on from step {step} to step {total}. Its learning-rate schedule from"
            f" here is that of a run planned for {total} steps, while the steps so far followed the shorter plan, so"
            f" the result is not bit-identical to a run of {total} steps from the start."
        )

    def finished(self, total: int, final_dir: Path, method, log) -> bool:
        """Whether the checkpoint is the last step of this run and ``final_dir`` is written from it (the method's
        weights, the same as the checkpoint's, hyperparameters.yaml, and what the method finishes with: LoRA's merged
        lit_model.pth); if so, says so. An earlier run's final/, which this run had not yet replaced, is not."""
        if self.saved is None or self.saved["progress"]["step"] < total:
            return False
        needed = [method.weights_file, "hyperparameters.yaml"]
        needed += ["lit_model.pth"] if method.finish is not nothing_to_finish else []
        if not all((final_dir / name).is_file() for name in needed):
            return False
        if file_sha256(final_dir / method.weights_file) != self.saved["weights"]["sha256"]:
            return False
        log(
            f"The run in {final_dir.parent} is finished: step {total} of {total}, and {final_dir} is written. Nothing"
            " to do (to train on, raise --train.max_steps or --train.epochs)."
        )
        return True

    def trained_micro_batch(self, train):
        """``train`` at the micro-batch size the checkpoint trained with (the memory search may have chosen one below
        --train.micro_batch_size); ``train`` itself for a fresh run."""
        size = self.saved["progress"].get("micro_batch_size") if self.saved is not None else None
        return dataclasses.replace(train, micro_batch_size=size) if size else train

    def report(self) -> dict | None:
        """For seq_lengths.json: ``{"step_dir", "step"}``, or None for a fresh run."""
        if self.step_dir is None:
            return None
        return {"step_dir": str(self.step_dir), "step": self.saved["progress"]["step"]}
