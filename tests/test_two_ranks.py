"""Two CPU ranks (gloo) through the command line: periodic validation, the example generated at the end of the epoch,
checkpoints, a SIGTERM and a resume, ending bit-identical to an uninterrupted two-rank run."""

import os
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, cli_args, stopped_by_sigterm_after_step_one

pytestmark = pytest.mark.e2e

TWO_RANKS = (
    "--devices",
    "2",
    "--train.micro_batch_size",
    "1",
    "--train.global_batch_size",
    "4",  # 2 micro-batches per rank and step
    "--train.epochs",
    "1",  # 12 samples: 6 micro-batches per rank, 3 steps, then the end-of-epoch example
    "--eval.interval",
    "1",
    "--eval.max_new_tokens",
    "3",
    "--train.save_interval",
    "1",
    "--lora_dropout",
    "0.1",
)


def command(checkpoint, data, out_dir, *flags) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "finetune_lora.py"),
        str(checkpoint),
        *cli_args(data, out_dir, *TWO_RANKS, *flags, steps=None),
    ]


def run(checkpoint, data, out_dir, *flags) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        command(checkpoint, data, out_dir, *flags), capture_output=True, text=True, env=env, timeout=300
    )


def lora(out_dir) -> dict:
    return torch.load(out_dir / "final" / "lit_model.pth.lora", weights_only=True)["model"]


def initial_val_loss(stdout: str) -> float:
    (line,) = [line for line in stdout.splitlines() if line.startswith("Initial validation | val loss: ")]
    return float(line.rpartition(" ")[2])


def test_two_ranks_validate_generate_stop_on_sigterm_and_resume_bit_identical(
    tiny_checkpoint, make_data, tmp_path, cli_here
):
    # 3 val samples: rank 0 holds samples 0 and 2, rank 1 sample 1 and a repeat of sample 0 that must weigh nothing
    data = make_data([60, 80, 100, 120, 140, 160, 70, 90, 110, 130, 150, 65], [60, 90, 75])

    whole = run(tiny_checkpoint, data, tmp_path / "whole", "--eval.initial_validation", "true")
    assert whole.returncode == 0, whole.stderr[-3000:]
    periodic = [line for line in whole.stdout.splitlines() if line.startswith("iter ") and "val loss" in line]
    assert len(periodic) == 3 and "Number of epochs 1 reached" in whole.stdout
    one_device = cli_here(
        data, tmp_path / "one", "--eval.initial_validation", "true", "--train.lr_warmup_steps", "0", steps=1
    )
    assert one_device.returncode == 0, one_device.stderr[-3000:]
    assert abs(initial_val_loss(whole.stdout) - initial_val_loss(one_device.stdout)) < 2e-4  # same weights, same loss

    interrupted_dir = tmp_path / "interrupted"
    stopped = stopped_by_sigterm_after_step_one(command(tiny_checkpoint, data, interrupted_dir))
    out = stopped.stdout
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "Stopped at step" in out and not (interrupted_dir / "final").exists()

    resumed = run(tiny_checkpoint, data, interrupted_dir, "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed at step" in resumed.stdout
    expected, got = lora(tmp_path / "whole"), lora(interrupted_dir)
    assert expected.keys() == got.keys() and all(torch.equal(expected[key], got[key]) for key in expected)
