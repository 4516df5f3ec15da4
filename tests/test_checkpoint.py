"""Checkpoints on disk: --resume's meaning, which checkpoint is complete, crash safety, and the same-run checks.

Checkpoints here are written by the real ``checkpoint.state.save`` through a one-device CPU Fabric, for a model whose
only trainable tensor is a LoRA one; the step files are a LoRA file holding a value, so a test can tell which save
a file comes from.
"""

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from litgpt.args import TrainArgs

from helpers import ROOT
from litgpt_seqlen.args import SeqArgs, parse_resume
from litgpt_seqlen.checkpoint import atomic, lookup, same_run
from litgpt_seqlen.checkpoint import state as training_state
from litgpt_seqlen.checkpoint.layout import (
    FORMAT,
    HEADER,
    STATE_DIR,
    STATE_FILE,
    file_sha256,
    sampled_difference,
    sampled_fingerprint,
    sampled_offsets,
)
from litgpt_seqlen.errors import UserInputError
from litgpt_seqlen.methods import LORA
from litgpt_seqlen.training.rng import restore_rng

LORA_FILE = LORA.weights_file
WEIGHTS = (LORA.weights_file, LORA.trainable)  # what a LoRA run's checkpoints hold

HEADER_PARTS = {"run": {}, "data": {}, "decision": {}}


@pytest.fixture(scope="module")
def fabric():
    return L.Fabric(accelerator="cpu", devices=1)


class Adapter(torch.nn.Module):
    """A frozen base weight and a LoRA one, as fit's model has them (only ``lora_*`` goes into a checkpoint)."""

    def __init__(self, value: float = 0.0, size: int = 2) -> None:
        super().__init__()
        self.lora_A = torch.nn.Parameter(torch.full((size,), value))
        self.weight = torch.nn.Parameter(torch.zeros(size), requires_grad=False)


def make_state(value: float = 0.0, step: int = 0, size: int = 2) -> dict:
    model = Adapter(value, size)
    optimizer = torch.optim.AdamW([model.lora_A], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    state = training_state.new_state(model, optimizer, scheduler, accumulation=2, device=torch.device("cpu"))
    state["step"] = step
    return state


def write_lora_file(directory: Path, value: float, size: int = 2) -> None:
    torch.save({"model": {"lora_A": torch.full((size,), value)}}, directory / LORA_FILE)


def save_checkpoint(fabric, out_dir: Path, step: int, value: float | None = None, header_parts=HEADER_PARTS) -> Path:
    """A checkpoint of ``step`` whose LoRA file and LoRA tensor hold ``value`` (default: the step)."""
    value = float(step) if value is None else value
    step_dir = out_dir / f"step-{step:06d}"
    state = make_state(value, step)
    training_state.save(
        fabric, step_dir, state, lambda directory: write_lora_file(directory, value), header_parts, *WEIGHTS
    )
    return step_dir


def lora_value(step_dir: Path) -> float:
    return torch.load(step_dir / LORA_FILE, weights_only=True)["model"]["lora_A"][0].item()


def quiet(_: str) -> None:
    pass


# ---------------------------------------------------------------------------------------------------------------
# --resume: which checkpoint
# ---------------------------------------------------------------------------------------------------------------


def test_resume_values_parse_as_litgpt_takes_them():
    values = (False, "false", "no", "0", "", None, True, "True", "yes", "1", "auto", " AUTO ")
    assert [parse_resume(v) for v in values] == [False] * 6 + [True] * 4 + ["auto"] * 2
    assert parse_resume("out/step-000002") == Path("out/step-000002")
    assert parse_resume(Path("out/step-000002")) == Path("out/step-000002")


def test_false_never_looks(fabric, tmp_path):
    save_checkpoint(fabric, tmp_path, 2)
    assert lookup.find_checkpoint(tmp_path, False) is None
    assert lookup.find_checkpoint(tmp_path, parse_resume("false")) is None


def test_auto_picks_the_newest_complete_and_skips_partial_ones(fabric, tmp_path):
    complete = save_checkpoint(fabric, tmp_path, 2)
    save_checkpoint(fabric, tmp_path, 4)
    (tmp_path / "step-000006").mkdir()  # killed after the step dir, before its state
    write_lora_file(tmp_path / "step-000006", 6.0)
    (tmp_path / ".tmp-step-000008").mkdir()  # killed while writing the step dir
    write_lora_file(tmp_path / ".tmp-step-000008", 8.0)
    (tmp_path / STATE_DIR / "step-000004" / STATE_FILE).unlink()  # a state without its tensors
    (tmp_path / "step-000010-old").mkdir()  # not a step directory
    notes = []
    assert lookup.find_checkpoint(tmp_path, "auto", log=notes.append) == complete
    assert notes == [
        f"Skipping {tmp_path / 'step-000006'}: no training state at {tmp_path / STATE_DIR / 'step-000006' / HEADER}"
        " (not saved by a resumable run, or it stopped while saving).",
        f"Skipping {tmp_path / 'step-000004'}: {tmp_path / STATE_DIR / 'step-000004'} lacks {STATE_FILE}.",
        f"Resuming training from {complete / LORA_FILE}, the newest complete checkpoint in --out_dir {tmp_path}"
        " (--resume auto).",
    ]
    assert lookup.find_checkpoint(tmp_path, True, log=notes.append) == complete
    assert notes[-1].endswith("(--resume true).")


def test_auto_starts_fresh_and_true_errors_without_a_complete_checkpoint(tmp_path):
    (tmp_path / "step-000002").mkdir()
    write_lora_file(tmp_path / "step-000002", 2.0)
    notes = []
    assert lookup.find_checkpoint(tmp_path, "auto", log=notes.append) is None
    assert notes[-1] == f"No complete checkpoint in --out_dir {tmp_path}: starting fresh (--resume auto)."
    with pytest.raises(UserInputError, match=r"--resume true: there is no complete checkpoint in --out_dir .*auto"):
        lookup.find_checkpoint(tmp_path, True, log=quiet)
    assert lookup.find_checkpoint(tmp_path / "never_made", "auto", log=quiet) is None


def test_a_path_must_be_a_complete_checkpoint(fabric, tmp_path):
    step_dir = save_checkpoint(fabric, tmp_path, 2)
    notes = []
    assert lookup.find_checkpoint(tmp_path, parse_resume(str(step_dir)), log=notes.append) == step_dir
    assert notes == [f"Resuming training from {step_dir / LORA_FILE} (--resume {step_dir})."]
    (tmp_path / "final").mkdir()
    write_lora_file(tmp_path / "final", 1.0)
    (tmp_path / "empty").mkdir()
    for path, reason in [
        (tmp_path / "step-000009", "no such directory"),
        (tmp_path / "final", "no training state"),
        (tmp_path / "empty", "no training state"),
    ]:
        with pytest.raises(UserInputError, match=rf"--resume {path}: not a checkpoint to resume from: {reason}"):
            lookup.find_checkpoint(tmp_path, path, log=quiet)


# ---------------------------------------------------------------------------------------------------------------
# A checkpoint is complete only when every file is the one saved
# ---------------------------------------------------------------------------------------------------------------


def test_one_training_state_file_recorded_by_its_sha256(fabric, tmp_path):
    step_dir = save_checkpoint(fabric, tmp_path, 2)
    state_dir = tmp_path / STATE_DIR / "step-000002"
    assert sorted(path.name for path in state_dir.iterdir()) == [HEADER, STATE_FILE]
    header = lookup.read_header(step_dir)
    assert header["files"] == {STATE_FILE: file_sha256(state_dir / STATE_FILE)}
    assert header["weights"] == {"file": LORA_FILE, "sha256": file_sha256(step_dir / LORA_FILE)}
    assert header["step_dir"] == "step-000002" and header["progress"]["step"] == 2
    saved = torch.load(state_dir / STATE_FILE, weights_only=True)
    assert list(saved["model"]) == ["lora_A"]  # the base weights are not in it
    assert len(saved["ranks"]) == 1
    assert lookup.incomplete_reason(step_dir) is None


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-1])


@pytest.mark.parametrize("damage", [flip_a_byte, truncate])
def test_a_damaged_state_is_incomplete_and_auto_uses_the_older_intact_one(fabric, tmp_path, damage):
    older = save_checkpoint(fabric, tmp_path, 2)
    newer = save_checkpoint(fabric, tmp_path, 4)
    state_file = tmp_path / STATE_DIR / "step-000004" / STATE_FILE
    damage(state_file)
    reason = f"{state_file} is damaged (its sha256 is not the one recorded when it was saved)"
    assert lookup.incomplete_reason(newer) == reason
    notes = []
    assert lookup.find_checkpoint(tmp_path, "auto", log=notes.append) == older
    assert notes[0] == f"Skipping {newer}: {reason}."
    with pytest.raises(UserInputError, match=f"--resume {newer}: not a checkpoint to resume from: {state_file} is"):
        lookup.find_checkpoint(tmp_path, newer, log=quiet)


def test_a_damaged_or_foreign_header_is_incomplete(fabric, tmp_path):
    save_checkpoint(fabric, tmp_path, 2)
    step_dir = save_checkpoint(fabric, tmp_path, 4)
    header = tmp_path / STATE_DIR / "step-000004" / HEADER
    header.write_text(header.read_text()[:20])
    assert lookup.incomplete_reason(step_dir).startswith(f"its training state {header} is unreadable")
    header.write_text((tmp_path / STATE_DIR / "step-000002" / HEADER).read_text())  # another step's
    assert lookup.incomplete_reason(step_dir) == f"{header} belongs to 'step-000002'"


def test_a_header_of_another_format_is_incomplete_and_says_so(fabric, tmp_path):
    step_dir = save_checkpoint(fabric, tmp_path, 2)
    header = tmp_path / STATE_DIR / "step-000002" / HEADER
    header.write_text(json.dumps({**json.loads(header.read_text()), "format": FORMAT - 1}))
    assert lookup.incomplete_reason(step_dir) == (
        f"its training state {header} is of format {FORMAT - 1}, this version reads format {FORMAT} (saved by another"
        " version of this code, which can resume it)"
    )


def test_a_step_dir_written_over_after_its_state_is_not_complete(fabric, tmp_path):
    step_dir = save_checkpoint(fabric, tmp_path, 2, value=1.0)
    write_lora_file(step_dir, 2.0)  # e.g. a fresh run writing over it, killed before its own state
    assert "not the one its training state was saved with" in lookup.incomplete_reason(step_dir)


# ---------------------------------------------------------------------------------------------------------------
# The training state round trip
# ---------------------------------------------------------------------------------------------------------------


def test_the_training_state_round_trips(fabric, tmp_path):
    state = make_state(value=1.0, step=3)
    state["model"].lora_A.grad = torch.ones(2)
    state["optimizer"].step()
    state["scheduler"].step()
    state.update(iteration=6, epoch=1, position=1, elapsed_seconds=12.5, micro_batch_size=2)
    for loss in (3.0, 2.0, 1.0):
        state["running_loss"].update(torch.tensor(loss))
    state["token_counts"]["raw_tokens"] += 123
    step_dir = tmp_path / "step-000003"
    torch.manual_seed(5)
    training_state.save(
        fabric, step_dir, state, lambda directory: write_lora_file(directory, 1.0), HEADER_PARTS, *WEIGHTS
    )
    expected_draw = torch.rand(3)

    loaded = make_state(value=0.0)
    torch.manual_seed(0)
    training_state.load(fabric, step_dir, loaded)
    assert torch.equal(loaded["model"].lora_A, state["model"].lora_A)
    assert torch.equal(loaded["model"].weight, torch.zeros(2))  # the base weight is left as it was
    saved_moments = state["optimizer"].state_dict()["state"][0]
    loaded_moments = loaded["optimizer"].state_dict()["state"][0]
    assert all(torch.equal(loaded_moments[key], saved_moments[key]) for key in saved_moments)
    assert loaded["scheduler"].state_dict() == state["scheduler"].state_dict()
    assert {key: loaded[key] for key in training_state.PROGRESS} == {
        "step": 3,
        "iteration": 6,
        "epoch": 1,
        "position": 1,
        "elapsed_seconds": 12.5,
        "micro_batch_size": 2,
    }
    assert loaded["token_counts"]["raw_tokens"].item() == 123
    assert loaded["running_loss"].compute() == torch.tensor(1.5)  # the last two (the window)
    assert loaded["rng"] is not None  # restored by fit, last
    restore_rng(loaded["rng"])
    assert torch.equal(torch.rand(3), expected_draw)


# ---------------------------------------------------------------------------------------------------------------
# Crash safety
# ---------------------------------------------------------------------------------------------------------------


def test_rewriting_a_checkpoint_replaces_both_parts(fabric, tmp_path):
    save_checkpoint(fabric, tmp_path, 2, value=1.0)
    step_dir = save_checkpoint(fabric, tmp_path, 2, value=3.0)
    assert lookup.incomplete_reason(step_dir) is None
    assert lora_value(step_dir) == 3.0
    assert sorted(p.name for p in tmp_path.iterdir()) == [STATE_DIR, "step-000002"]  # no temporaries left
    assert sorted(p.name for p in (tmp_path / STATE_DIR).iterdir()) == ["step-000002"]


def test_a_write_that_fails_midway_leaves_the_old_checkpoint_and_a_temporary_that_is_removed(fabric, tmp_path):
    step_dir = save_checkpoint(fabric, tmp_path, 2, value=1.0)

    def dies(directory: Path) -> None:
        write_lora_file(directory, 5.0)
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        atomic.write_checkpoint_dir_atomically(step_dir, dies)
    assert lora_value(step_dir) == 1.0 and lookup.incomplete_reason(step_dir) is None
    assert atomic.remove_stale_temporaries(tmp_path) == [tmp_path / ".tmp-step-000002"]
    (tmp_path / STATE_DIR / ".tmp-step-000004").mkdir()
    (tmp_path / STATE_DIR / ".tmp-old-step-000002").write_text("")
    assert atomic.remove_stale_temporaries(tmp_path) == [
        tmp_path / STATE_DIR / ".tmp-old-step-000002",
        tmp_path / STATE_DIR / ".tmp-step-000004",
    ]
    assert atomic.remove_stale_temporaries(tmp_path / "never_made") == []


class Killed(BaseException):
    pass


def test_a_kill_at_any_file_operation_of_a_rewrite_leaves_only_whole_checkpoints(fabric, tmp_path, monkeypatch):
    """Rewriting step-000004 (as a fresh run in the same out_dir does), "killed" at its n-th file write, rename or
    removal, for every n (a killed write leaves half a file): auto resume then chooses a checkpoint whose LoRA file and
    training state belong together, and once the rewrite has got through, the new one."""
    real = {"replace": os.replace, "rmtree": atomic.shutil.rmtree, "write_text": Path.write_text}
    n = 0
    while True:
        out_dir = tmp_path / f"kill-{n}"
        save_checkpoint(fabric, out_dir, 2)
        save_checkpoint(fabric, out_dir, 4)
        calls = []

        def reached(name: str) -> bool:
            calls.append(name)
            return len(calls) > n

        def killable(name):
            def operation(*args, **kwargs):
                if reached(name):
                    raise Killed
                return real[name](*args, **kwargs)

            return operation

        def write_text(path, text, *args, **kwargs):
            if reached("write_text"):
                real["write_text"](path, text[: len(text) // 2])
                raise Killed
            return real["write_text"](path, text, *args, **kwargs)

        def save_state(path, *args, **kwargs):
            if reached("fabric.save"):
                Path(path).write_bytes(b"\x80\x02half")
                raise Killed
            return type(fabric).save(fabric, path, *args, **kwargs)

        def write_step_files(directory: Path) -> None:
            if reached("step files"):
                (directory / LORA_FILE).write_bytes(b"\x80\x02half")
                raise Killed
            write_lora_file(directory, 40.0)

        monkeypatch.setattr(os, "replace", killable("replace"))
        monkeypatch.setattr(atomic.shutil, "rmtree", killable("rmtree"))
        monkeypatch.setattr(Path, "write_text", write_text)
        monkeypatch.setattr(fabric, "save", save_state)
        try:
            training_state.save(
                fabric, out_dir / "step-000004", make_state(40.0, 40), write_step_files, HEADER_PARTS, *WEIGHTS
            )
            finished = True
        except Killed:
            finished = False
        monkeypatch.undo()

        chosen = lookup.find_checkpoint(out_dir, "auto", log=quiet)
        step = lookup.read_header(chosen)["progress"]["step"]
        assert lora_value(chosen) == {2: 2.0, 4: 4.0, 40: 40.0}[step], calls
        loaded = make_state()
        training_state.load(fabric, chosen, loaded)
        assert loaded["step"] == step and loaded["model"].lora_A[0].item() == lora_value(chosen), calls
        if finished:
            assert step == 40 and not list(out_dir.rglob(".tmp-*"))
            assert {"replace", "rmtree", "write_text", "fabric.save", "step files"} <= set(calls)
            break
        n += 1
    assert n >= 8


def test_a_fresh_run_forgets_the_old_runs_states_but_keeps_their_weights(fabric, tmp_path):
    save_checkpoint(fabric, tmp_path, 2)
    save_checkpoint(fabric, tmp_path, 4)
    assert atomic.forget_training_states(tmp_path) == ["step-000002", "step-000004"]
    assert lookup.find_checkpoint(tmp_path, "auto", log=quiet) is None
    assert lora_value(tmp_path / "step-000004") == 4.0
    assert list((tmp_path / STATE_DIR).iterdir()) == []
    assert atomic.forget_training_states(tmp_path / "never_made") == []


def test_fsync_raises_for_a_file_it_cannot_flush(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    atomic.fsync_path(tmp_path / "file")
    atomic.fsync_path(tmp_path)

    def refuses(descriptor):
        raise OSError("fsync refused")

    monkeypatch.setattr(atomic.os, "fsync", refuses)
    atomic.fsync_path(tmp_path)  # a directory: some file systems refuse, which is let pass
    with pytest.raises(OSError, match="fsync refused"):
        atomic.fsync_path(tmp_path / "file")


SAVER = """
import sys
sys.path.insert(0, {root!r})
from pathlib import Path
import lightning as L, torch
from litgpt_seqlen.checkpoint import state as training_state
from litgpt_seqlen.methods import LORA

fabric = L.Fabric(accelerator="cpu", devices=1)
out = Path(sys.argv[1])
big = 1 << 20
for step in range(1, 1000):
    model = torch.nn.Module()
    model.lora_A = torch.nn.Parameter(torch.full((big,), float(step)))
    optimizer = torch.optim.SGD([model.lora_A], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    state = training_state.new_state(model, optimizer, scheduler, 1, torch.device("cpu"))
    state["step"] = step
    write = lambda d, step=step: torch.save({{"model": {{"lora_A": torch.full((big,), float(step))}}}}, d / LORA.weights_file)
    training_state.save(fabric, out / f"step-{{step % 3:06d}}", state, write, {{}}, LORA.weights_file, LORA.trainable)
    print(step, flush=True)
"""


@pytest.mark.e2e
def test_sigkill_during_a_save_never_leaves_a_complete_looking_checkpoint(fabric, tmp_path):
    """A process saves checkpoints in a loop (big files, so saves take a while) and is SIGKILLed mid-way; whatever
    it left, auto resume chooses a checkpoint that is whole (its state names it and its LoRA file matches)."""
    script = tmp_path / "saver.py"
    script.write_text(SAVER.format(root=str(ROOT)))
    out_dir = tmp_path / "out"
    process = subprocess.Popen([sys.executable, str(script), str(out_dir)], stdout=subprocess.PIPE, text=True)
    for _ in range(4):
        assert process.stdout.readline()
    time.sleep(0.03)
    process.kill()
    process.wait()
    chosen = lookup.find_checkpoint(out_dir, "auto", log=quiet)
    assert chosen is not None
    step = lookup.read_header(chosen)["progress"]["step"]
    assert lora_value(chosen) == step
    model = torch.nn.Module()
    model.lora_A = torch.nn.Parameter(torch.zeros(1 << 20))
    optimizer = torch.optim.SGD([model.lora_A], lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    loaded = training_state.new_state(model, optimizer, scheduler, 1, torch.device("cpu"))
    training_state.load(fabric, chosen, loaded)
    assert loaded["step"] == step and model.lora_A[0].item() == step


# ---------------------------------------------------------------------------------------------------------------
# Same run, same data, same model
# ---------------------------------------------------------------------------------------------------------------


def test_check_same_run_names_every_change():
    saved = {
        "run": {"train.micro_batch_size": 2, "seed": 1337, "seq.group_by_length": False, "lora_dropout": 0.05},
        "data": same_run.data_fingerprint({"train": [5, 6, 7], "val": [3, 4], "test": [2]}),
    }
    same = {
        "run": dict(saved["run"]),
        "data": same_run.data_fingerprint({"train": [5, 6, 7], "val": [3, 4], "test": [2]}),
    }
    same_run.check_same_run(saved, same)
    current = {
        "run": {"train.micro_batch_size": 4, "seed": 1337, "seq.group_by_length": True, "lora_dropout": 0.1},
        "data": same_run.data_fingerprint({"train": [5, 9, 7], "val": [3, 4, 4]}),
    }
    with pytest.raises(UserInputError) as error:
        same_run.check_same_run(saved, current, "out/step-000004")
    message = str(error.value)
    assert message.startswith("cannot resume from out/step-000004: this run differs from the one that saved it: ")
    assert "--train.micro_batch_size was 2, now 4" in message
    assert "--seq.group_by_length was False, now True" in message
    assert "--lora_dropout was 0.05, now 0.1" in message
    assert "--seed" not in message
    assert "the train split has the same count but other token lengths: train sample 1 had 6 tokens, now 9" in message
    assert "the val split had 2 samples, now 3" in message
    assert "the test split is missing now (1 samples then)" in message
    assert message.endswith("or start a new run with --resume false (or another --out_dir).")


class Examples(torch.utils.data.Dataset):
    """As litgpt's SFTDataset holds its samples: the raw examples in ``.data``."""

    def __init__(self, data: list) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)


def samples_as_bytes(texts: list[str]):
    return [json.dumps({"instruction": text, "output": "x"}).encode() for text in texts]


def test_a_sample_edited_at_the_same_length_is_named_by_split_index_and_place():
    lengths = {"train": [5, 6, 7], "val": [3, 4]}
    texts = {"train": ["one", "two", "three"], "val": ["four", "five"]}
    contents = {name: samples_as_bytes(values) for name, values in texts.items()}
    saved = json.loads(json.dumps({"data": same_run.data_fingerprint(lengths, contents)}))  # as state.json holds it
    same_run.check_same_run(saved, {"data": same_run.data_fingerprint(lengths, contents)})

    edited = {**contents, "train": samples_as_bytes(["one", "two", "tree"])}
    current = {"data": same_run.data_fingerprint(lengths, edited)}
    with pytest.raises(UserInputError) as error:
        same_run.check_same_run(saved, current, "out/step-000004", where=lambda split, i: f"position {i} of t.json")
    message = str(error.value)
    assert "the train split has the same token lengths but other content: train sample 2 differs" in message
    assert "train sample 2 differs (position 2 of t.json)" in message
    assert "val split" not in message
    # a change of key order is no change of content; a changed value in any field is
    assert same_run.content_fingerprint([json.dumps({"b": 1, "a": 2}, sort_keys=True).encode()]) == (
        same_run.content_fingerprint([json.dumps({"a": 2, "b": 1}, sort_keys=True).encode()])
    )


def test_sample_contents_reads_raw_examples_and_falls_back_to_items():
    examples = [{"output": "b", "instruction": "a"}, {"instruction": "c", "output": "d"}]
    assert list(same_run.sample_contents(Examples(examples))) == [
        json.dumps(example, sort_keys=True).encode() for example in examples
    ]

    class Items(torch.utils.data.Dataset):  # no list of examples: each item (its token ids) is the content
        def __len__(self) -> int:
            return 2

        def __getitem__(self, index: int) -> dict:
            return {"input_ids": torch.tensor([index, 7]), "labels": torch.tensor([-100, 7])}

    assert list(same_run.sample_contents(Items())) == [
        b'{"input_ids": [0, 7], "labels": [-100, 7]}',
        b'{"input_ids": [1, 7], "labels": [-100, 7]}',
    ]


def test_run_flags_hold_every_flag_that_changes_the_weights():
    train = TrainArgs(micro_batch_size=2, global_batch_size=4, epochs=1, max_steps=5, lr_warmup_steps=1)
    lora = dict(lora_r=4, lora_alpha=8, lora_dropout=0.1, lora_query=True, lora_key=False, lora_value=True)
    config = SimpleNamespace(**lora, lora_projection=False, lora_mlp=False, lora_head=False)
    flags = same_run.run_flags(LORA, train, SeqArgs(), 7, 1, "AdamW", "32-true", config)
    seq_flags = {name.removeprefix("seq.") for name in flags if name.startswith("seq.")}
    every_seq_flag = {field.name for field in dataclasses.fields(SeqArgs)}
    assert seq_flags == every_seq_flag - {"dry_run", "scan_workers", "rehearse", "fit_micro_batch", "memory_margin"}
    assert flags["seed"] == 7 and flags["devices"] == 1 and flags["lora_dropout"] == 0.1
    assert flags == json.loads(json.dumps(flags))  # as a header holds them

    resumed = same_run.run_flags(
        LORA, train, SeqArgs(dry_run=True, scan_workers=3, rehearse=False), 7, 1, "AdamW", "32-true", config
    )
    same_run.check_same_run({"run": flags}, {"run": resumed})  # these change nothing that is trained
    changed = same_run.run_flags(LORA, train, SeqArgs(truncate_from="end"), 7, 1, "AdamW", "32-true", config)
    with pytest.raises(UserInputError, match="--seq.truncate_from was 'prompt', now 'end'"):
        same_run.check_same_run({"run": flags}, {"run": changed})


def test_run_flags_hold_the_data_settings_that_make_other_tokens_of_the_same_examples(tmp_path):
    """The examples are fingerprinted as written; masking the prompt trains other labels from the same tokens."""
    from litgpt.data import JSON
    from litgpt.prompts import Alpaca

    config = SimpleNamespace(**{name: 1 for name in LORA.config_flags})
    (tmp_path / "data.json").write_text("[]")
    data = JSON(json_path=tmp_path / "data.json", mask_prompt=False, prompt_style=Alpaca())
    flags = same_run.run_flags(LORA, TrainArgs(), SeqArgs(), 7, 1, "AdamW", "32-true", config, data)
    assert {name: flags[name] for name in flags if name.startswith("data.")} == {
        "data.prompt_style": "Alpaca",
        "data.mask_prompt": False,
        "data.ignore_index": -100,
    }
    assert flags == same_run.run_flags(LORA, TrainArgs(), SeqArgs(), 7, 1, "AdamW", "32-true", config, data)
    masked = JSON(json_path=tmp_path / "data.json", mask_prompt=True, prompt_style=Alpaca())
    changed = same_run.run_flags(LORA, TrainArgs(), SeqArgs(), 7, 1, "AdamW", "32-true", config, masked)
    with pytest.raises(UserInputError, match="--data.mask_prompt was False, now True"):
        same_run.check_same_run({"run": flags}, {"run": changed})


def test_the_length_decision_round_trips():
    record = same_run.decision_record(300, {"train": [0, 2, 3], "val": [0, 1]}, {"train": 5, "val": 2})
    record = json.loads(json.dumps(record))
    assert record == {"max_seq_length": 300, "dropped": {"train": [1, 4], "val": []}, "counts": {"train": 5, "val": 2}}
    assert same_run.kept_from_record(record) == {"train": [0, 2, 3], "val": [0, 1]}


def test_a_checkpoint_of_another_base_model_is_refused(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "step-000002").mkdir()
    (tmp_path / STATE_DIR / "step-000002").mkdir(parents=True)
    (tmp_path / STATE_DIR / "step-000002" / HEADER).write_text("{}")  # no base weights recorded
    (tmp_path / "base" / "model_config.yaml").write_text("n_layer: 2\nn_embd: 32\n")
    (tmp_path / "step-000002" / "model_config.yaml").write_text("n_layer: 4\nn_embd: 32\n")
    with pytest.raises(UserInputError, match=r"another base model .*\(n_layer: 4 there, 2 here\)"):
        same_run.check_same_model(tmp_path / "step-000002", tmp_path / "base")
    (tmp_path / "step-000002" / "model_config.yaml").write_text("n_embd: 32\nn_layer: 2\n")
    same_run.check_same_model(tmp_path / "step-000002", tmp_path / "base")


class OneRank:
    global_rank, world_size = 0, 1

    def __init__(self) -> None:
        self.printed = []

    def print(self, message: str) -> None:
        self.printed.append(message)

    def barrier(self) -> None:
        pass


def length_plan(kept_train: list[int], max_seq_length: int = 8):
    lengths = {"train": [5, 9, 7, 4], "val": [3, 6]}
    examples = {
        name: [{"instruction": f"{name} {i}", "output": "x"} for i in range(len(v))] for name, v in lengths.items()
    }
    return SimpleNamespace(
        lengths=lengths,
        kept={"train": kept_train, "val": [0, 1]},
        decision=SimpleNamespace(max_seq_length=max_seq_length),
        datasets={name: Examples(samples) for name, samples in examples.items()},
        where=lambda split, index: None,
    )


def test_begin_a_fresh_run_tidies_the_out_dir_and_a_resumed_one_checks_the_checkpoint(fabric, tmp_path):
    one_rank = OneRank()
    save_checkpoint(fabric, tmp_path, 2)
    (tmp_path / ".tmp-step-000004").mkdir()
    run = {"seed": 1, "train.micro_batch_size": 2}

    # a dry run (saves nothing) leaves the old run's states alone
    resumption, _ = same_run.begin(one_rank, tmp_path, None, length_plan([0, 2, 3]), run, saves=False)
    assert lookup.incomplete_reason(tmp_path / "step-000002") is None
    assert one_rank.printed == [f"Removed {tmp_path / '.tmp-step-000004'}: left by a save that did not finish."]
    assert resumption.report() is None

    # a fresh run that trains: the old run can no longer be resumed
    plan = length_plan([0, 2, 3])
    resumption, same_plan = same_run.begin(one_rank, tmp_path, None, plan, run, saves=True)
    assert same_plan is plan
    assert "step-000002 of an earlier run are no longer resumable" in one_rank.printed[-1]
    assert lookup.find_checkpoint(tmp_path, "auto", log=quiet) is None
    parts = resumption.header_parts
    assert parts["run"] == run and parts["decision"]["dropped"] == {"train": [1], "val": []}
    contents = {name: same_run.sample_contents(dataset) for name, dataset in plan.datasets.items()}
    assert parts["data"] == same_run.data_fingerprint({"train": [5, 9, 7, 4], "val": [3, 6]}, contents)
    assert parts["base"] is None  # no checkpoint_dir given: nothing recorded

    # its own checkpoint resumes; a changed flag, or another decision from the same data, stops before any weight
    step_dir = save_checkpoint(fabric, tmp_path, 4, header_parts=parts)
    resumption, _ = same_run.begin(one_rank, tmp_path, step_dir, length_plan([0, 2, 3]), run, saves=True)
    assert resumption.report() == {"step_dir": str(step_dir), "step": 4}
    assert resumption.header_parts == parts
    with pytest.raises(UserInputError, match="--seed was 1, now 2"):
        same_run.begin(one_rank, tmp_path, step_dir, length_plan([0, 2, 3]), {**run, "seed": 2}, saves=True)
    with pytest.raises(UserInputError, match=r"max_seq_length 8, this run decides 9 .*split train: 3 samples kept"):
        same_run.begin(one_rank, tmp_path, step_dir, length_plan([0, 1, 2, 3], 9), run, saves=True)


def test_begin_records_the_base_weights_of_a_run_that_saves_and_not_of_a_dry_run(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "lit_model.pth").write_bytes(b"weights")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    run = {"seed": 1}
    resumption, _ = same_run.begin(OneRank(), out_dir, None, length_plan([0]), run, saves=True, base=tmp_path / "base")
    assert resumption.header_parts["base"] == {
        **sampled_fingerprint(tmp_path / "base" / "lit_model.pth"),
        "path": str(tmp_path / "base" / "lit_model.pth"),
    }
    (tmp_path / "base" / "lit_model.pth").unlink()  # a dry run needs no weights
    resumption, _ = same_run.begin(OneRank(), out_dir, None, length_plan([0]), run, saves=False, base=tmp_path / "base")
    assert resumption.header_parts["base"] is None


def test_other_base_weights_of_the_same_config_are_refused_naming_checkpoint_dir(fabric, tmp_path):
    base, other = tmp_path / "base", tmp_path / "other"
    for directory, weights in ((base, b"A" * 5000), (other, b"A" * 4999 + b"B")):
        directory.mkdir()
        (directory / "model_config.yaml").write_text("n_layer: 2\n")
        (directory / "lit_model.pth").write_bytes(weights)
    parts = {**HEADER_PARTS, "base": same_run.base_fingerprint(base)}
    step_dir = save_checkpoint(fabric, tmp_path / "out", 2, header_parts=parts)
    (step_dir / "model_config.yaml").write_text("n_layer: 2\n")
    same_run.check_same_model(step_dir, base)
    with pytest.raises(UserInputError) as error:
        same_run.check_same_model(step_dir, other)
    assert str(error.value) == (
        f"--resume {step_dir}: that checkpoint was trained on other base weights than checkpoint_dir {other}"
        f" ({other / 'lit_model.pth'}: same size (5000 bytes), other bytes in the sampled block at offset 0; it was"
        f" trained from {base / 'lit_model.pth'}). Pass the checkpoint_dir it was trained from, or start a new run"
        " with --resume false (or another --out_dir)."
    )
    (other / "lit_model.pth").write_bytes(b"A" * 5001)
    with pytest.raises(UserInputError, match=r"lit_model.pth: size 5000 bytes then, 5001 now; it was trained from"):
        same_run.check_same_model(step_dir, other)
    (other / "lit_model.pth").unlink()  # a dry run needs no weights: nothing to compare
    same_run.check_same_model(step_dir, other)


def test_a_tokenizer_with_two_ids_swapped_is_refused_on_resume(fabric, tmp_path):
    """Same vocabulary size, same sample lengths, other ids: only the tokenizer's own record can tell."""
    base = tmp_path / "base"
    base.mkdir()
    (base / "model_config.yaml").write_text("n_layer: 2\n")
    vocabulary = {"a": 0, "b": 1, "c": 2}
    (base / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocabulary}}))
    (base / "tokenizer_config.json").write_text("{}")
    resumption, _ = same_run.begin(OneRank(), tmp_path / "out", None, length_plan([0]), {}, saves=True, base=base)
    step_dir = save_checkpoint(fabric, tmp_path / "out", 2, header_parts=resumption.header_parts)
    (step_dir / "model_config.yaml").write_text("n_layer: 2\n")
    same_run.check_same_model(step_dir, base)

    (base / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {**vocabulary, "a": 1, "b": 0}}}))
    with pytest.raises(UserInputError) as error:
        same_run.check_same_model(step_dir, base)
    assert str(error.value).startswith(
        f"--resume {step_dir}: that checkpoint was trained with another tokenizer than checkpoint_dir {base} has"
        " (tokenizer.json changed); the same text would now be other token ids."
    )
    (base / "tokenizer.json").write_text(json.dumps({"model": {"vocab": vocabulary}}))
    (base / "tokenizer_config.json").unlink()
    (base / "generation_config.json").write_text("{}")
    with pytest.raises(UserInputError, match=r"\(generation_config.json added, tokenizer_config.json removed\)"):
        same_run.check_same_model(step_dir, base)


# ---------------------------------------------------------------------------------------------------------------
# The base weights' sampled fingerprint
# ---------------------------------------------------------------------------------------------------------------


def test_sampled_offsets_cover_a_small_file_whole_and_a_large_one_first_last_and_evenly_between():
    assert sampled_offsets(0, block=4, count=3) == []
    assert sampled_offsets(5, block=4, count=3) == [0, 4]
    assert sampled_offsets(12, block=4, count=3) == [0, 4, 8]  # exactly count blocks: whole
    assert sampled_offsets(13, block=4, count=3) == [0, 4, 9]  # the last block ends at the file's end
    offsets = sampled_offsets(140 * 10**9)
    assert len(offsets) == 32 and offsets[0] == 0 and offsets[-1] == 140 * 10**9 - (1 << 20)
    gaps = {b - a for a, b in zip(offsets, offsets[1:])}
    assert max(gaps) - min(gaps) <= 1


def test_sampled_fingerprint_sees_a_change_in_any_sampled_block_and_any_size_change(tmp_path):
    path = tmp_path / "lit_model.pth"
    content = bytes(range(256)) * 40  # 10240 bytes: 4 sampled blocks of 64 bytes, not the whole file
    path.write_bytes(content)
    saved = json.loads(json.dumps(sampled_fingerprint(path, block=64, count=4)))
    offsets = [offset for offset, _ in saved["blocks"]]
    assert saved["size"] == 10240 and offsets == sampled_offsets(10240, 64, 4) and len(offsets) == 4
    assert sampled_difference(saved, sampled_fingerprint(path, block=64, count=4)) is None
    for offset in offsets:
        for where in (offset, offset + 63):  # a block's first byte and its last
            changed = bytearray(content)
            changed[where] ^= 0xFF
            path.write_bytes(changed)
            difference = sampled_difference(saved, sampled_fingerprint(path, block=64, count=4))
            assert difference == f"same size (10240 bytes), other bytes in the sampled block at offset {offset}"
    for size in (10239, 10241):
        path.write_bytes(content[:size] if size < len(content) else content + b"x")
        difference = sampled_difference(saved, sampled_fingerprint(path, block=64, count=4))
        assert difference == f"size 10240 bytes then, {size} now"


def test_sampled_fingerprint_of_an_empty_and_a_small_file(tmp_path):
    empty, small = tmp_path / "empty", tmp_path / "small"
    empty.write_bytes(b"")
    small.write_bytes(b"abc")
    assert sampled_fingerprint(empty) == {"size": 0, "block_size": 1 << 20, "blocks": []}
    assert sampled_fingerprint(small) == {
        "size": 3,
        "block_size": 1 << 20,
        "blocks": [[0, hashlib.sha256(b"abc").hexdigest()]],
    }
    assert sampled_difference(sampled_fingerprint(empty), sampled_fingerprint(small)) == "size 0 bytes then, 3 now"
    small.write_bytes(b"abd")
    assert (
        sampled_difference(sampled_fingerprint(tmp_path / "small"), json.loads(json.dumps(sampled_fingerprint(small))))
        is None
    )


def test_a_resumed_run_may_go_on_for_more_steps_never_fewer(tmp_path):
    saved = {"run": {"train.max_steps": 6, "train.epochs": 1, "seed": 1}, "progress": {"step": 6}}

    def resumed_with(max_steps: int) -> training_state.Resumption:
        run = {"train.max_steps": max_steps, "train.epochs": 1, "seed": 1}
        return training_state.Resumption(tmp_path / "step-000006", saved, {"run": run})

    said = []
    resumed_with(6).check_run_length(6, said.append)
    assert said == [] and resumed_with(6).length_changed() == []
    resumed_with(8).check_run_length(8, said.append)
    assert "--train.max_steps was 6, now 8" in said[0] and "not bit-identical" in said[0]
    assert resumed_with(8).length_changed() == ["--train.max_steps was 6, now 8"]
    with pytest.raises(UserInputError, match="checkpoint is at step 6"):
        resumed_with(4).check_run_length(4, said.append)
    # every other setting must still match
    with pytest.raises(UserInputError, match="--seed was 1, now 2"):
        same_run.check_same_run(saved, {"run": {"train.max_steps": 8, "train.epochs": 1, "seed": 2}})


def test_a_lengthened_schedule_goes_on_as_one_planned_for_the_new_length():
    from litgpt_seqlen.training.schedule import get_lr_scheduler, replanned_schedule

    def optimizer():
        return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)

    short = optimizer()
    scheduler = get_lr_scheduler(short, warmup_steps=2, max_steps=6)
    for _ in range(6):
        short.step()
        scheduler.step()
    long = optimizer()  # the reference: planned for 8 steps from the start
    reference = get_lr_scheduler(long, warmup_steps=2, max_steps=8)
    for _ in range(6):
        long.step()
        reference.step()
    replanned = replanned_schedule(short, warmup_steps=2, max_steps=8, step=6)
    for _ in range(2):
        assert replanned.get_last_lr() == pytest.approx(reference.get_last_lr())
        short.step(), long.step()
        replanned.step(), reference.step()
    assert replanned.get_last_lr() == pytest.approx(reference.get_last_lr())
