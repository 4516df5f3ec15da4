"""Where and how this run writes its checkpoints: one object that knows the out_dir, the method, the header and the
atomic writer, so the training loop calls ``save(state)`` and nothing else.

    OUT_DIR/step-000040/          upstream's files for the method (its weights file, configs, hyperparameters.yaml,
                                  prompt_style.yaml), written whole or not at all
    OUT_DIR/resume/step-000040/   the training state that makes it resumable (``state``)
    OUT_DIR/final/                upstream's files, then what the method finishes with (LoRA: the merged weights)
"""

from __future__ import annotations

from pathlib import Path

from litgpt import utils as litgpt_utils
from litgpt.prompts import save_prompt_style

from litgpt_seqlen.checkpoint import state as training_state
from litgpt_seqlen.cli.hyperparameters import write_hyperparameters
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
            self.fabric, step_dir, state, write_files, self.header, self.method.weights_file, self.method.trainable
        )
        return step_dir

    def save_final(self, model, precision: str | None) -> None:
        """final/: upstream's files, then what the method finishes with (written in place, as upstream does)."""
        final_dir = self.out_dir / "final"
        self.write_upstream_files(model, final_dir)
        if self.fabric.global_rank == 0:
            self.method.finish(final_dir, self.base_dir, precision)
        self.fabric.barrier()

    def write_upstream_files(self, model, directory: Path) -> None:
        """The trained weights, config files, prompt style and hyperparameters, as upstream lays them out."""
        directory.mkdir(parents=True, exist_ok=True)
        self.method.save_weights(self.fabric, model, directory / self.method.weights_file)
        if self.fabric.global_rank == 0:
            litgpt_utils.copy_config_files(self.base_dir, directory)
            write_hyperparameters(directory, self.hyperparameters, self.method)
            save_prompt_style(self.prompt_style, directory)
        self.fabric.barrier()
