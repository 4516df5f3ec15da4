"""--resume through the command line: an interrupted run ends with exactly the LoRA weights of one never interrupted.

The reference is always an uninterrupted run with the same flags. An interruption is made honestly: either the run
is stopped by a signal, or the checkpoints a full run wrote after step k are deleted (what a kill right after step k
leaves) and the same command is resumed. 10 train samples, micro-batch 2, global batch 4: an epoch is 5
micro-batches (random or grouped), so step 3 takes one micro-batch from epoch 1 and one from epoch 2.
"""

import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import demo_assets
import resume_state
from conftest import ROOT, cli_args, read_report, run_cli

TRAIN_LENGTHS = [60, 95, 70, 120, 64, 88, 101, 75, 66, 110]
VAL_LENGTHS = [62, 90]
FLAGS = ("--train.global_batch_size", "4", "--train.save_interval", "1", "--eval.interval", "3")
STEPS = 5
GROUPED = {"random": (), "grouped": ("--seq.group_by_length", "true"), "packed": ("--seq.pack", "true")}


@pytest.fixture(scope="module")
def resume_data(tiny_checkpoint, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("resume_data")
    demo_assets.build_data(directory, tiny_checkpoint, TRAIN_LENGTHS, VAL_LENGTHS)
    return directory


@pytest.fixture(scope="module")
def uninterrupted(tiny_checkpoint, resume_data, tmp_path_factory):
    """uninterrupted(kind) -> the out_dir of a full run (checkpoints at every step), run once per kind."""
    runs = {}

    def run(kind: str) -> Path:
        if kind not in runs:
            out_dir = tmp_path_factory.mktemp(f"uninterrupted_{kind}") / "out"
            result = run_cli(tiny_checkpoint, resume_data, out_dir, *FLAGS, *GROUPED[kind], steps=STEPS)
            assert result.returncode == 0, result.stderr[-3000:]
            runs[kind] = out_dir
        return runs[kind]

    return run


def cli_command(checkpoint: Path, data_dir: Path, out_dir: Path, *flags: str, steps: int) -> list[str]:
    """What run_cli runs, for a run the test signals while it trains."""
    return [
        sys.executable,
        str(ROOT / "finetune_lora.py"),
        str(checkpoint),
        *cli_args(data_dir, out_dir, *flags, steps=steps),
    ]


def lora(directory: Path) -> dict[str, torch.Tensor]:
    return torch.load(directory / "lit_model.pth.lora", weights_only=True)["model"]


def assert_identical(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    different = [name for name in ours if not torch.equal(ours[name], theirs[name])]
    assert not different, different


def lose_everything_after(out_dir: Path, step: int) -> None:
    """What a run killed right after saving ``step`` has: nothing of the later steps, no final/."""
    shutil.rmtree(out_dir / "final")
    for later in range(step + 1, STEPS + 1):
        shutil.rmtree(out_dir / f"step-{later:06d}")
        shutil.rmtree(out_dir / "resume" / f"step-{later:06d}")


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["random", "grouped", "packed"])
def test_resumed_inside_epoch_1_and_inside_epoch_2_the_run_ends_bit_identical(
    kind, uninterrupted, tiny_checkpoint, resume_data, tmp_path
):
    reference = uninterrupted(kind)
    out_dir = tmp_path / "out"
    shutil.copytree(reference, out_dir)

    lose_everything_after(out_dir, 2)
    assert kind == "packed" or resume_state.read_header(out_dir / "step-000002")["progress"] | {
        "elapsed_seconds": 0
    } == {
        "step": 2,
        "iteration": 4,
        "epoch": 0,  # inside epoch 1: 4 of its 5 micro-batches trained
        "position": 4,
        "elapsed_seconds": 0,
    }
    result = run_cli(tiny_checkpoint, resume_data, out_dir, *FLAGS, *GROUPED[kind], "--resume", "true", steps=STEPS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resuming from {out_dir / 'step-000002'}, the newest complete checkpoint" in result.stdout
    assert_identical(lora(out_dir / "final"), lora(reference / "final"))
    assert read_report(out_dir)["resumed_from"] == {"step_dir": str(out_dir / "step-000002"), "step": 2}
    logged = (out_dir / "logs" / "csv" / "version_1" / "metrics.csv").read_text().splitlines()
    column = logged[0].split(",").index("resumed_from_step")
    assert [row.split(",")[column] for row in logged[1:] if row.split(",")[column]] == ["2"]

    lose_everything_after(out_dir, 4)
    assert resume_state.read_header(out_dir / "step-000004")["progress"]["epoch"] == 1  # inside epoch 2 (packed too)
    step_dir = str(out_dir / "step-000004")
    result = run_cli(tiny_checkpoint, resume_data, out_dir, *FLAGS, *GROUPED[kind], "--resume", step_dir, steps=STEPS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resuming from {step_dir} (--resume {step_dir})" in result.stdout
    assert_identical(lora(out_dir / "final"), lora(reference / "final"))


@pytest.mark.e2e
def test_auto_skips_what_a_killed_save_left_and_resumes_from_the_newest_whole_checkpoint(
    uninterrupted, tiny_checkpoint, resume_data, tmp_path
):
    reference = uninterrupted("random")
    out_dir = tmp_path / "out"
    shutil.copytree(reference, out_dir)
    shutil.rmtree(out_dir / "final")
    # killed while saving step 5: its step directory is in place, its training state only half written
    shutil.rmtree(out_dir / "resume" / "step-000005")
    (out_dir / "resume" / ".tmp-step-000005").mkdir()
    (out_dir / "resume" / ".tmp-step-000005" / "rank-0.pt").write_bytes(b"\x80half")
    (out_dir / ".tmp-step-000006").mkdir()

    result = run_cli(tiny_checkpoint, resume_data, out_dir, *FLAGS, "--resume", "auto", steps=STEPS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Skipping {out_dir / 'step-000005'}: no training state" in result.stdout
    assert f"Resuming from {out_dir / 'step-000004'}" in result.stdout
    assert not list(out_dir.glob(".tmp-*")) and not list((out_dir / "resume").glob(".tmp-*"))
    assert resume_state.incomplete_reason(out_dir / "step-000005") is None  # written again, whole
    assert_identical(lora(out_dir / "final"), lora(reference / "final"))


SIGNAL_STEPS = 30


@pytest.fixture(scope="module")
def uninterrupted_long(tiny_checkpoint, resume_data, tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("uninterrupted_long") / "out"
    result = run_cli(tiny_checkpoint, resume_data, out_dir, "--train.global_batch_size", "4", steps=SIGNAL_STEPS)
    assert result.returncode == 0, result.stderr[-3000:]
    return out_dir


@pytest.mark.e2e
@pytest.mark.parametrize(
    "signal_number, exit_code, workers, to_group",
    # Ctrl-C in a terminal signals the whole group, workers too; the reference run has no workers (same weights)
    [(signal.SIGTERM, 143, "0", False), (signal.SIGINT, 130, "2", True)],
)
def test_a_signal_saves_after_the_step_exits_and_the_printed_command_ends_bit_identical(
    signal_number, exit_code, workers, to_group, uninterrupted_long, tiny_checkpoint, resume_data, tmp_path
):
    out_dir = tmp_path / "out"
    flags = ("--train.global_batch_size", "4", "--data.num_workers", workers)
    command = cli_command(tiny_checkpoint, resume_data, out_dir, *flags, steps=SIGNAL_STEPS)
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1")
    with open(tmp_path / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, cwd=tmp_path, start_new_session=True
        )
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "(step)" in line:  # training is under way: interrupt it
                os.killpg(process.pid, signal_number) if to_group else process.send_signal(signal_number)
                break
        lines += process.stdout.readlines()
        process.wait(timeout=300)
    stdout, stderr = "".join(lines), (tmp_path / "stderr.txt").read_text()
    assert process.returncode == exit_code, stderr[-3000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == {143: "terminated (SIGTERM)", 130: "interrupted (Ctrl-C)"}[exit_code]
    assert f"{signal.Signals(signal_number).name} received: stopping after this optimizer step" in stdout
    stopped = next(line for line in lines if line.startswith("Stopped at step"))
    step = int(stopped.split()[3].rstrip("."))
    assert 0 < step < SIGNAL_STEPS and not (out_dir / "final").exists()
    step_dir = out_dir / f"step-{step:06d}"
    assert resume_state.incomplete_reason(step_dir) is None

    resume_command = shlex.split(stopped.partition("To resume: ")[2])
    assert resume_command[0] == "python" and resume_command[-2:] == ["--resume", str(step_dir)]
    result = subprocess.run(
        [sys.executable, *resume_command[1:]], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resumed at step {step}" in result.stdout
    assert_identical(lora(out_dir / "final"), lora(uninterrupted_long / "final"))


@pytest.mark.e2e
def test_bad_resume_inputs_exit_2_with_the_reason_and_no_traceback(
    uninterrupted, tiny_checkpoint, resume_data, tmp_path
):
    step_dir = str(uninterrupted("random") / "step-000002")
    other_model = tmp_path / "other_model"
    other_model.mkdir()
    demo_assets.build_tokenizer(other_model)
    demo_assets.build_checkpoint(other_model, block_size=256)
    other_data = tmp_path / "other_data"
    demo_assets.build_data(other_data, tiny_checkpoint, [*TRAIN_LENGTHS[:3], 61, *TRAIN_LENGTHS[4:]], VAL_LENGTHS)

    cases = [
        (tiny_checkpoint, resume_data, ("--resume", "true"), "--resume true: there is no complete checkpoint"),
        (tiny_checkpoint, resume_data, ("--resume", str(resume_data)), "not a checkpoint to resume from"),
        (other_model, resume_data, ("--resume", step_dir), "trained on another base model"),
        (
            tiny_checkpoint,
            resume_data,
            ("--resume", step_dir, "--train.micro_batch_size", "1"),
            "--train.micro_batch_size was 2, now 1",
        ),
        (tiny_checkpoint, other_data, ("--resume", step_dir), "train sample 3 had 120 tokens, now 61"),
    ]
    for number, (checkpoint, data, flags, reason) in enumerate(cases):
        result = run_cli(checkpoint, data, tmp_path / f"out{number}", *FLAGS, *flags, steps=STEPS)
        assert result.returncode == 2, (flags, result.stderr[-3000:])
        assert "Traceback" not in result.stderr
        assert "error: " in result.stderr and reason in result.stderr, (flags, result.stderr[-3000:])
