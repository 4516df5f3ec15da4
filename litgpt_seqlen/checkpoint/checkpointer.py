"""Where and how this run writes its checkpoints: one object that knows the out_dir, the method, the header and the
atomic writer, so the training loop calls ``save(state)`` and nothing else.

    OUT_DIR/step-000040/          upstream's files for the method (its weights file, configs, hyperparameters.yaml,
                                  prompt_style.yaml), written whole or not at all
    OUT_DIR/resume/step-000040/   the training state that makes it resumable (``state``)
    OUT_DIR/final/                upstream's files, then what the method finishes with (LoRA: the merged weights),
                                  written whole or not at all

A file system that fills during a write stops every rank with an ``error:`` that names what was being written, the
free space, and the command that goes on from the newest complete checkpoint; the half-written part is removed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from litgpt import utils as litgpt_utils
from litgpt.prompts import save_prompt_style

from litgpt_seqlen import ranks
from litgpt_seqlen.checkpoint import atomic, lookup
from litgpt_seqlen.checkpoint import state as training_state
from litgpt_seqlen.cli.hyperparameters import write_hyperparameters
from litgpt_seqlen.cli.resume_command import resume_command
from litgpt_seqlen.errors import UserInputError
from litgpt_seqlen.methods import Method


class Checkpointer:
    def __init__(self, fabric, out_dir: Path, method: Method, base_dir: Path, prompt_style, hyperparameters, header):
        """``base_dir``: the base model's checkpoint directory (its config and tokenizer files are copied);
        ``hyperparameters``: the parsed command line; ``header``: what every checkpoint records to be resumed."""
        self.fabric, self.out_dir, self.method, self.base_dir = fabric, Path(out_dir), method, Path(base_dir)
        self.prompt_style, self.hyperparameters, self.header = prompt_style, hyperparameters, header

    def step_dir(self, step: int) -> Path:
        return self.out_dir / f"step-{step:06d}"

    def save(self, state: dict) -> Path:
        """A resumable checkpoint of the optimizer step ``state`` is at (its progress already recorded in it)."""
        step_dir = self.step_dir(state["step"])
        write_files = lambda directory: self.write_upstream_files(state["model"], directory)
        training_state.save(
            self.fabric,
            step_dir,
            state,
            write_files,
            self.header,
            self.method.weights_file,
            self.method.trainable,
            agree=self.agree,
        )
        return step_dir

    def save_final(self, model, precision: str | None) -> None:
        """final/: upstream's files, then what the method finishes with, written into ``.tmp-final`` and renamed into
        place once whole (an earlier run's final/ is replaced only then)."""

        def write(directory: Path) -> None:
            self.write_upstream_files(model, directory)
            if self.fabric.global_rank == 0:
                self.method.finish(directory, self.base_dir, precision)

        final = self.out_dir / "final"
        with atomic.checkpoint_writes(self.fabric):
            atomic.write_checkpoint_dir_atomically(
                final, write, is_writer=self.fabric.global_rank == 0, agree=self.agree
            )
        files = sorted(path.name for path in final.iterdir()) if self.fabric.global_rank == 0 else []
        self.fabric.print(f"Saved the fine-tuned model to {final}: {', '.join(files)}")

    def write_upstream_files(self, model, directory: Path) -> None:
        """The trained weights, config files, prompt style and hyperparameters, as upstream lays them out (into a
        directory rank 0 made; every rank calls it, only rank 0 writes)."""
        self.method.save_weights(self.fabric, model, directory / self.method.weights_file)
        if self.fabric.global_rank == 0:
            litgpt_utils.copy_config_files(self.base_dir, directory)
            write_hyperparameters(directory, self.hyperparameters, self.method)
            save_prompt_style(self.prompt_style, directory)

    def agree(self, problem: atomic.OutOfSpace | None) -> None:
        """Called by every rank where a write's ranks meet: out of space on any rank, every rank raises the error that
        says how to go on (rank 0 prints it)."""
        ranks.agree_on_error(self.fabric, None if problem is None else self.out_of_space(problem))

    def out_of_space(self, problem: atomic.OutOfSpace) -> UserInputError:
        """``problem``'s message, and how to go on: from the newest complete checkpoint, once there is room."""
        newest = lookup.newest_complete(self.out_dir)
        if newest is None:
            how = (
                f"There is no complete checkpoint in {self.out_dir} to go on from: free space there (or choose an"
                " --out_dir with more room), then run the same command again."
            )
        else:
            how = (
                f"Free space there, then go on from the newest complete checkpoint, {newest}:"
                f" {resume_command(sys.argv, newest)}"
            )
        return UserInputError(f"{problem} {how}")
