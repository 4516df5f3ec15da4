"""A full disk: every write lies beside its destination (never in the system temp directory), a file system that fills
during a step checkpoint or final/ stops the run with an `error:` that says how to go on, nothing half-written is
left, and an earlier final/ stays until a whole new one replaces it.

The disk fills where a test says: ``torch.save`` raises OSError(ENOSPC) after writing part of the file it was asked
for, as a real full disk does once the checkpoint writers hand torch a Python file.
"""

import errno
import io
import shlex
import tempfile
from pathlib import Path

import lightning as L
import pytest
import torch

from litgpt_seqlen.checkpoint import atomic, lookup
from litgpt_seqlen.checkpoint import state as training_state
from litgpt_seqlen.checkpoint.layout import STATE_DIR, STATE_FILE
from litgpt_seqlen.methods import LORA


def fills_the_disk_at(monkeypatch, ending: str, code: int = errno.ENOSPC) -> list[str]:
    """From now on, ``torch.save`` into a file whose path ends with ``ending`` writes a few bytes, then fails as a
    full disk does. Returns the list of such paths it was asked for."""
    real, hit = torch.save, []

    def save(obj, f, *args, **kwargs):
        name = str(getattr(f, "name", f))
        if name.endswith(ending):
            hit.append(name)
            f.write(b"PK\x03\x04half a file")
            raise OSError(code, "No space left on device" if code == errno.ENOSPC else "Disk quota exceeded")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    return hit


def temporaries(out: Path) -> list[Path]:
    return sorted(out.rglob(".tmp-*"))


def error_line(run) -> str:
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    line = run.stderr.strip().splitlines()[-1]
    assert line.startswith("error: out of space while writing "), line
    return line


def test_a_full_disk_in_a_step_checkpoint_says_how_to_go_on_and_resume_auto_finishes(
    cli_here, make_data, tmp_path, monkeypatch
):
    data, out = make_data([100, 120, 90, 80], [110, 90]), tmp_path / "out"
    flags = ("--train.save_interval", "2")
    with monkeypatch.context() as patch:
        hit = fills_the_disk_at(patch, f"{STATE_DIR}/.tmp-step-000004/.tmp-{STATE_FILE}")
        run = cli_here(data, out, *flags, steps=4)
    line = error_line(run)
    assert hit and f"writing {out / STATE_DIR / 'step-000004'} (No space left on device)" in line
    assert (
        "15 bytes of it had been written (now removed); " in line and " free on the file system that holds it." in line
    )
    newest = out / "step-000002"
    assert f"the newest complete checkpoint, {newest}: python " in line and line.endswith(f"--resume {newest}")
    assert lookup.newest_complete(out) == newest and lookup.incomplete_reason(out / "step-000004") is not None
    assert not (out / "final").exists() and temporaries(out) == []

    # What a run killed while writing final/ leaves: cleaned by the next run.
    (out / ".tmp-final").mkdir()
    (out / ".tmp-final" / LORA.weights_file).write_bytes(b"half")
    (out / ".tmp-old-final").mkdir()
    resumed = cli_here(data, out, *flags, "--resume", "auto", steps=4)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resuming training from {newest / LORA.weights_file}" in resumed.stdout
    assert f"Removed {out / '.tmp-final'}: left by a save that did not finish." in resumed.stdout
    assert (out / "final" / "lit_model.pth").is_file() and lookup.incomplete_reason(out / "step-000004") is None
    assert temporaries(out) == []
    again = cli_here(data, out, *flags, "--resume", "auto", steps=4)  # final/ holds step 4's weights: nothing to do
    assert again.returncode == 0 and f"The run in {out} is finished: step 4 of 4" in again.stdout


def test_a_full_disk_in_final_keeps_the_earlier_final_and_the_printed_command_finishes(
    cli_here, cli_argv, make_data, tmp_path, monkeypatch
):
    """An earlier run's whole final/ stays while this run's cannot be written, and is not taken for this run's."""
    data, out = make_data([100, 120, 90, 80], [110, 90]), tmp_path / "out"
    earlier = out / "final"
    earlier.mkdir(parents=True)
    for name in (LORA.weights_file, "lit_model.pth", "hyperparameters.yaml", "model_config.yaml"):
        (earlier / name).write_text(f"an earlier run's {name}")
    before = {path.name: path.read_bytes() for path in earlier.iterdir()}
    with monkeypatch.context() as patch:
        hit = fills_the_disk_at(patch, ".tmp-final/lit_model.pth")  # in LoRA's merge, the last file of final/
        run = cli_here(data, out, steps=2)
    line = error_line(run)
    assert hit and f"writing {earlier} (No space left on device)" in line
    assert {path.name: path.read_bytes() for path in earlier.iterdir()} == before and temporaries(out) == []
    newest = out / "step-000002"
    command = shlex.split(line.partition(f"the newest complete checkpoint, {newest}: ")[2])
    assert command[0] == "python" and command[-2:] == ["--resume", str(newest)]

    resumed = cli_argv(command[1:])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "is finished" not in resumed.stdout  # the earlier final/ is not this run's
    assert set(before) < {path.name for path in earlier.iterdir()}
    assert all((earlier / name).read_bytes() != content for name, content in before.items())
    assert torch.load(earlier / "lit_model.pth", weights_only=True) and temporaries(out) == []


def files_fill_the_disk_at(monkeypatch, name: str) -> list[str]:
    """From now on, a file named ``name`` that ``atomic.write_file_atomically`` writes takes a few bytes, then fails
    as a full disk does. Returns the paths it was asked for."""
    hit = []

    class Filling(io.BufferedWriter):
        def write(self, data) -> int:
            super().write(bytes(data)[:7])
            raise OSError(errno.ENOSPC, "No space left on device")

    def opening(path, mode="r", *args, **kwargs):
        if Path(path).name != name:
            return open(path, mode, *args, **kwargs)
        hit.append(str(path))
        return Filling(io.FileIO(path, "w"))

    monkeypatch.setattr(atomic, "open", opening, raising=False)
    return hit


@pytest.mark.parametrize("report_file", [".tmp-seq_lengths.json", ".tmp-seq_lengths.png"])
def test_a_full_disk_while_the_report_is_written_is_one_error_and_no_half_file(
    cli_here, make_data, tmp_path, monkeypatch, report_file
):
    data, out = make_data([100, 120, 90, 80], [110, 90]), tmp_path / "out"
    with monkeypatch.context() as patch:
        hit = files_fill_the_disk_at(patch, report_file)
        run = cli_here(data, out, "--seq.dry_run", "true")
    line = error_line(run)
    written = out / report_file.removeprefix(".tmp-")
    assert hit and line.startswith(f"error: out of space while writing {written} (No space left on device); ")
    assert " free on the file system that holds it." in line and "--resume auto" in line
    assert not written.exists() and temporaries(out) == []


def test_a_full_disk_anywhere_else_is_one_error_naming_what_is_known(capsys):
    from litgpt_seqlen.exits import user_facing

    with pytest.raises(SystemExit) as leaving, user_facing.user_facing_exits():
        raise RuntimeError("the logger's flush failed") from OSError(errno.EDQUOT, "Disk quota exceeded")
    assert leaving.value.code == 2
    message = capsys.readouterr().err
    assert message.startswith("error: out of space while writing a file (Disk quota exceeded). Free space there")
    assert len(message.splitlines()) == 1


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_out_of_space_removes_the_partial_directory_and_keeps_the_old_one(tmp_path, code):
    target = tmp_path / "step-000002"
    target.mkdir()
    (target / "weights").write_text("old")

    def fills(directory: Path) -> None:
        (directory / "weights").write_bytes(b"x" * 3000)
        raise OSError(code, "full")

    with pytest.raises(atomic.OutOfSpace) as raised:
        atomic.write_checkpoint_dir_atomically(target, fills)
    assert raised.value.path == target and raised.value.written == 3000 and raised.value.error.errno == code
    assert str(raised.value).startswith(f"out of space while writing {target} (full): 2.9 KiB of it had been written")
    assert (target / "weights").read_text() == "old" and temporaries(tmp_path) == []

    def fails_otherwise(directory: Path) -> None:
        raise OSError(errno.EACCES, "denied")

    with pytest.raises(PermissionError):  # not a full disk: raised as it is
        atomic.write_checkpoint_dir_atomically(target, fails_otherwise)


def test_a_rename_that_fails_puts_the_old_directory_back(tmp_path, monkeypatch):
    old, new = tmp_path / "final", tmp_path / ".tmp-final"
    old.mkdir()
    new.mkdir()
    (old / "file").write_text("old")
    real, calls = atomic.os.replace, []

    def replace(source, target):
        calls.append(Path(target).name)
        if len(calls) == 2:  # the new directory into place, once the old one is aside
            raise OSError(errno.ENOSPC, "No space left on device")
        real(source, target)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError):
        atomic.replace_dir(new, old)
    assert calls == [".tmp-old-final", "final", "final"] and (old / "file").read_text() == "old"


class FillsAfter(io.BytesIO):
    """A file on a disk that fills after ``room`` bytes."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room

    def write(self, data) -> int:
        if self.tell() + len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        return super().write(data)


def test_torch_save_reports_a_full_disk_as_enospc_while_checkpoints_are_written():
    """Into a path, torch's own writer reports a full disk as a RuntimeError without an errno; into a Python file, as a
    RuntimeError raised over the OSError while closing the archive. In ``checkpoint_writes`` both are the OSError(ENOSPC),
    and outside it torch.save is torch's again."""
    real, weights = torch.save, {"weights": torch.zeros(1 << 12)}
    with pytest.raises(RuntimeError):
        torch.save(weights, FillsAfter(2000))
    targets = [FillsAfter(2000), *(["/dev/full"] if Path("/dev/full").exists() else [])]
    for target in targets:
        with atomic.checkpoint_writes(None), pytest.raises(OSError) as raised:
            torch.save(weights, target)
        assert raised.value.errno == errno.ENOSPC and torch.save is real


def test_nothing_is_written_under_the_system_temp_dir_during_a_save(tmp_path, monkeypatch):
    """Lightning's writer staged each file in the system temp directory (``tempfile.mkstemp()``) and moved it."""
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(system_tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    created = []
    for name in ("mkstemp", "mkdtemp", "NamedTemporaryFile", "TemporaryFile", "TemporaryDirectory"):
        real = getattr(tempfile, name)
        monkeypatch.setattr(tempfile, name, lambda *a, real=real, name=name, **k: created.append(name) or real(*a, **k))

    fabric = L.Fabric(accelerator="cpu", devices=1)
    model = torch.nn.Module()
    model.lora_A = torch.nn.Parameter(torch.ones(4))
    optimizer = torch.optim.SGD([model.lora_A], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = training_state.new_state(model, optimizer, scheduler, 1, torch.device("cpu"))
    state["step"] = 1
    out = tmp_path / "out"

    def write_step_files(directory: Path) -> None:
        fabric.save(directory / LORA.weights_file, {"model": model})

    header = {"run": {}, "data": {}, "decision": {}}
    training_state.save(fabric, out / "step-000001", state, write_step_files, header, *LORA_WEIGHTS)
    assert created == [] and list(system_tmp.iterdir()) == []
    assert lookup.incomplete_reason(out / "step-000001") is None and temporaries(out) == []
    assert type(fabric.strategy.checkpoint_io) is not atomic.WriteBeside  # put back after the save


LORA_WEIGHTS = (LORA.weights_file, LORA.trainable)
