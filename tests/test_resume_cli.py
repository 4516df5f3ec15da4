"""--resume and the stop signals through the command line, where the process boundary is the behaviour: a signal
stops a real run with a checkpoint and its exit code, the printed command resumes it in a new process and ends with
exactly the LoRA weights of a run never interrupted, a second Ctrl-C stops at once, and bad --resume input exits 2.

The resumed-run tests that need no process of their own (every batch order, auto resume past partial or damaged
checkpoints, each way a checkpoint can belong to another run) run the same flow in process: test_resume_fit.py.
"""

import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import assets
from helpers import ROOT, cli_args
from litgpt_seqlen.checkpoint import lookup
from litgpt_seqlen.cli.resume_command import resume_command
from litgpt_seqlen.exits.graceful_stop import GracefulStop

TRAIN_LENGTHS = [60, 95, 70, 120, 64, 88, 101, 75, 66, 110]
VAL_LENGTHS = [62, 90]


@pytest.fixture(scope="module")
def resume_data(tiny_checkpoint, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("resume_data")
    assets.build_data(directory, tiny_checkpoint, TRAIN_LENGTHS, VAL_LENGTHS)
    return directory


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


SIGNAL_STEPS = 30


@pytest.mark.e2e
@pytest.mark.parametrize(
    "signal_number, exit_code, workers, to_group",
    # Ctrl-C in a terminal signals the whole group, workers too; the reference run has no workers (same weights).
    # SIGTERM is the two-rank test's (tests/test_two_ranks.py).
    [(signal.SIGINT, 130, "2", True)],
)
def test_a_signal_saves_after_the_step_exits_and_the_printed_command_ends_bit_identical(
    signal_number, exit_code, workers, to_group, tiny_checkpoint, resume_data, tmp_path, cli_here, cli_argv
):
    """The signal reaches a process (its group, under Ctrl-C); the reference and the resume, run as printed, need none
    and run in this process."""
    uninterrupted = tmp_path / "uninterrupted"
    reference = cli_here(resume_data, uninterrupted, "--train.global_batch_size", "4", steps=SIGNAL_STEPS)
    assert reference.returncode == 0, reference.stderr[-3000:]
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
    assert lookup.incomplete_reason(step_dir) is None

    resume_command = shlex.split(stopped.partition("To resume: ")[2])
    assert resume_command[0] == "python" and resume_command[-2:] == ["--resume", str(step_dir)]
    result = cli_argv(resume_command[1:])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resumed at step {step}" in result.stdout
    assert_identical(lora(out_dir / "final"), lora(uninterrupted / "final"))


@pytest.mark.e2e
def test_a_bad_resume_exits_2_with_the_reason_and_no_traceback(resume_data, tmp_path, cli_here):
    result = cli_here(resume_data, tmp_path / "out", "--resume", "true")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "error: --resume true: there is no complete checkpoint" in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "out" / "final").exists()


# ---------------------------------------------------------------------------------------------------------------
# The stop signals, outside a run
# ---------------------------------------------------------------------------------------------------------------

LOOP = """
import sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
from litgpt_seqlen.exits.graceful_stop import GracefulStop
out = Path(sys.argv[1])
with GracefulStop() as stop:
    for step in range(1, 10_000):
        print("step", step, flush=True)
        time.sleep({step_seconds})  # the optimizer step
        if stop.requested:
            (out / f"step-{{step:06d}}").mkdir()
            sys.exit(stop.exit_code)
"""


@pytest.mark.e2e
def test_a_second_ctrl_c_stops_at_once(tmp_path):
    script = tmp_path / "loop.py"
    script.write_text(LOOP.format(root=str(ROOT), step_seconds=30))
    process = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().startswith("step 1")
    process.send_signal(signal.SIGINT)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=10)
    assert process.returncode in (-signal.SIGINT, 130)  # KeyboardInterrupt: Python ends by SIGINT
    assert "SIGINT received: stopping after this optimizer step" in stderr and "KeyboardInterrupt" in stderr
    assert not list(tmp_path.glob("step-*"))


def test_the_first_signal_only_asks_and_the_handlers_are_put_back():
    before = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    said = []
    with GracefulStop(log=said.append) as stop:
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        assert not stop.requested and stop.exit_code == 0
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.exit_code == 143
    assert said == [
        "SIGTERM received: stopping after this optimizer step, with a checkpoint. Ctrl-C again to stop at once.",
        "SIGTERM received again: already stopping after this optimizer step.",
    ]
    assert {number: signal.getsignal(number) for number in before} == before


def test_the_resume_command_is_the_run_with_its_resume_flag_replaced():
    argv = ["finetune_lora.py", "ckpt dir", "--resume", "auto", "--train.max_steps", "9", "--resume=false"]
    assert resume_command(argv, Path("out/step-000004")) == (
        "python finetune_lora.py 'ckpt dir' --train.max_steps 9 --resume out/step-000004"
    )
    assert resume_command(["finetune_lora.py"], Path("o/step-000001"), python="/venv/python").startswith(
        "/venv/python "
    )


def test_the_resume_command_of_the_console_command_is_as_typed(tmp_path, monkeypatch):
    """A console command's argv[0] is its full path: the user typed its name, which the shell finds on PATH."""
    command = tmp_path / "bin" / "litgpt-seqlen"
    command.parent.mkdir()
    command.write_text("#!/bin/sh\n")
    command.chmod(0o755)
    argv = [str(command), "finetune_adapter", "ckpt", "--resume", "auto"]
    monkeypatch.setenv("PATH", str(command.parent))
    assert resume_command(argv, Path("o/step-000002")) == "litgpt-seqlen finetune_adapter ckpt --resume o/step-000002"
    monkeypatch.setenv("PATH", str(tmp_path))  # not on PATH: the path it was run by
    assert resume_command(argv, Path("o/step-000002")).startswith(f"{command} finetune_adapter ckpt")


@pytest.mark.e2e
def test_a_second_signal_ends_a_run_stuck_where_python_cannot_act(tmp_path):
    """A rank stuck in a collective never returns to Python: the second SIGTERM still ends the process, with 143."""
    script = tmp_path / "stuck.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from litgpt_seqlen.exits.graceful_stop import GracefulStop, SecondSignalWatchdog\n"
        "SecondSignalWatchdog.GRACE_SECONDS = 0.1  # what the run waits for itself to stop: not what this test is about\n"
        "read, _ = os.pipe()\n"
        "with GracefulStop():\n"
        "    print('stuck', flush=True)\n"
        "    os.read(read, 1)  # never returns: the graceful stop's flag is never looked at\n"
    )
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "stuck"
    process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=30)
    assert process.returncode == 143 and "terminated (SIGTERM): the run did not stop by itself" in err
