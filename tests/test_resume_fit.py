"""A resumed run ends with exactly the LoRA weights of one never interrupted: the real flow, run in this process.

Run A trains STEPS steps, saving every step. Run B starts in a fresh out_dir that holds only A's checkpoint of step
k (its step directory and its training state, what a run killed right after saving step k leaves) and resumes from
it with the same flags. LoRA dropout is on, so B ends equal only if it draws the random numbers A drew.

10 train samples, micro-batch 2, global batch 4: an epoch is 3 steps of 4 samples (random or grouped; its last step
filled up with 2 samples from its start), 6 micro-batches, so step 3 ends exactly at the end of epoch 1 and step 4
inside epoch 2.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

import assets
from helpers import read_report
from litgpt_seqlen.checkpoint import lookup
from litgpt_seqlen.checkpoint import state as training_state
from litgpt_seqlen.checkpoint.layout import STATE_DIR
from litgpt_seqlen.methods import LORA

TRAIN_LENGTHS = [60, 95, 70, 120, 64, 88, 101, 75, 66, 110]
VAL_LENGTHS = [62, 90]
STEPS = 5
FLAGS = (
    "--train.global_batch_size",
    "4",
    "--train.save_interval",
    "1",
    "--eval.interval",
    "3",  # a validation (and a generated example) mid-run: it must not change what training draws
    "--lora_dropout",
    "0.1",
)
ORDER = {"random": (), "grouped": ("--seq.group_by_length", "true"), "packed": ("--seq.pack", "true")}


@pytest.fixture(scope="module")
def data_dir(tiny_checkpoint, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("resume_fit_data")
    assets.build_data(directory, tiny_checkpoint, TRAIN_LENGTHS, VAL_LENGTHS)
    return directory


@pytest.fixture(scope="module")
def uninterrupted_runs() -> dict:
    """The out_dir of each order's uninterrupted run, filled by the first test that needs it."""
    return {}


@pytest.fixture
def uninterrupted(cli_here, data_dir, uninterrupted_runs, tmp_path_factory):
    """uninterrupted(order) -> the out_dir of a full run with a checkpoint at every step."""

    def run(order: str) -> Path:
        if order not in uninterrupted_runs:
            out_dir = tmp_path_factory.mktemp(f"uninterrupted_{order}") / "out"
            result = cli_here(data_dir, out_dir, *FLAGS, *ORDER[order], steps=STEPS)
            assert result.returncode == 0, result.stderr[-3000:]
            uninterrupted_runs[order] = out_dir
        return uninterrupted_runs[order]

    return run


def only_checkpoint(source: Path, step: int, out_dir: Path) -> Path:
    """A fresh out_dir holding only ``source``'s checkpoint of ``step``; returns its step directory."""
    name = f"step-{step:06d}"
    shutil.copytree(source / name, out_dir / name)
    shutil.copytree(source / STATE_DIR / name, out_dir / STATE_DIR / name)
    return out_dir / name


def lora(directory: Path) -> dict[str, torch.Tensor]:
    return torch.load(directory / LORA.weights_file, weights_only=True)["model"]


def different(ours: dict, theirs: dict) -> list[str]:
    assert ours.keys() == theirs.keys()
    return [name for name in ours if not torch.equal(ours[name], theirs[name])]


# Mid-epoch (step 3) and just past an epoch's end (step 4): random at both, grouped and packed at one each.
@pytest.mark.parametrize("order, step", [("random", 3), ("random", 4), ("grouped", 4), ("packed", 3)])
def test_a_resumed_run_ends_bit_identical(order, step, uninterrupted, cli_here, data_dir, tmp_path):
    reference = uninterrupted(order)
    progress = lookup.read_header(reference / f"step-{step:06d}")["progress"]
    if order != "packed":  # packed rows: the micro-batches per epoch depend on the packing
        assert (progress["epoch"], progress["position"]) == {3: (0, 6), 4: (1, 2)}[step]
    out_dir = tmp_path / "out"
    step_dir = only_checkpoint(reference, step, out_dir)

    result = cli_here(data_dir, out_dir, *FLAGS, *ORDER[order], "--resume", str(step_dir), steps=STEPS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Resuming training from {step_dir / LORA.weights_file} (--resume {step_dir})" in result.stdout
    assert f"Resumed at step {step} (epoch {progress['epoch'] + 1}, {progress['position']} micro-batches in" in (
        result.stdout
    )
    assert not different(lora(out_dir / "final"), lora(reference / "final"))
    for later in range(step + 1, STEPS + 1):  # every checkpoint after the resume, too
        assert not different(lora(out_dir / f"step-{later:06d}"), lora(reference / f"step-{later:06d}"))
    assert read_report(out_dir)["resumed_from"] == {"step_dir": str(step_dir), "step": step}
    assert "resumed_from" not in read_report(reference)


def test_resumed_without_the_random_states_the_run_differs(uninterrupted, cli_here, data_dir, tmp_path, monkeypatch):
    """The test above could pass by accident if dropout drew nothing, or if the resumed run happened to draw the same
    numbers anyway: with everything restored but the random states, the weights differ."""
    reference = uninterrupted("random")
    out_dir = tmp_path / "out"
    step_dir = only_checkpoint(reference, 2, out_dir)
    load = training_state.load

    def load_without_rng(fabric, step_dir, state):
        load(fabric, step_dir, state)
        state["rng"] = None

    monkeypatch.setattr(training_state, "load", load_without_rng)
    result = cli_here(data_dir, out_dir, *FLAGS, "--resume", str(step_dir), steps=STEPS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert different(lora(out_dir / "final"), lora(reference / "final"))


def test_auto_skips_what_a_killed_save_left_and_resumes_from_the_newest_whole_checkpoint(
    uninterrupted, cli_here, data_dir, tmp_path
):
    reference = uninterrupted("random")
    out_dir = tmp_path / "out"
    shutil.copytree(reference, out_dir)
    shutil.rmtree(out_dir / "final")
    # killed while saving step 5: its step directory is in place, its training state only half written
    shutil.rmtree(out_dir / STATE_DIR / "step-000005")
    (out_dir / STATE_DIR / ".tmp-step-000005").mkdir()
    (out_dir / STATE_DIR / ".tmp-step-000005" / "state.pt").write_bytes(b"\x80half")
    (out_dir / ".tmp-step-000006").mkdir()
    # and step 4's training state was damaged on disk afterwards
    state_file = out_dir / STATE_DIR / "step-000004" / "state.pt"
    state_file.write_bytes(state_file.read_bytes()[:-100])

    result = cli_here(data_dir, out_dir, *FLAGS, "--resume", "auto", steps=STEPS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Skipping {out_dir / 'step-000005'}: no training state" in result.stdout
    assert f"Skipping {out_dir / 'step-000004'}: {state_file} is damaged" in result.stdout
    assert (
        f"Resuming training from {out_dir / 'step-000003' / LORA.weights_file}, the newest complete checkpoint"
        in result.stdout
    )
    assert not list(out_dir.glob(".tmp-*")) and not list((out_dir / STATE_DIR).glob(".tmp-*"))
    for step in (4, 5):  # written again, whole
        assert lookup.incomplete_reason(out_dir / f"step-{step:06d}") is None
    assert not different(lora(out_dir / "final"), lora(reference / "final"))


def test_a_resumed_run_logs_the_step_it_went_on_from(uninterrupted, cli_here, data_dir, tmp_path):
    out_dir = tmp_path / "out"
    step_dir = only_checkpoint(uninterrupted("random"), 2, out_dir)
    result = cli_here(data_dir, out_dir, *FLAGS, "--resume", str(step_dir), steps=STEPS)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = (out_dir / "logs" / "csv" / "version_0" / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert "resumed_from_step" in header, header
    column = header.index("resumed_from_step")
    assert [row.split(",")[column] for row in rows[1:] if row.split(",")[column]] == ["2"]


def test_a_checkpoint_of_another_run_stops_with_exit_2_naming_what_differs(
    uninterrupted, cli_here, tiny_checkpoint, data_dir, tmp_path
):
    """Each refused before any weight is read; nothing is written into the checkpoint's out_dir."""
    reference = uninterrupted("random")
    step_dir = str(reference / "step-000002")
    other_model = tmp_path / "other_model"
    other_model.mkdir()
    assets.build_tokenizer(other_model)
    assets.build_checkpoint(other_model, block_size=256)
    other_data = tmp_path / "other_data"
    assets.build_data(other_data, tiny_checkpoint, [*TRAIN_LENGTHS[:3], 61, *TRAIN_LENGTHS[4:]], VAL_LENGTHS)
    before = sorted(str(path.relative_to(reference)) for path in reference.rglob("*"))

    cases = [
        (None, data_dir, ("--resume", str(data_dir)), f"--resume {data_dir}: not a checkpoint to resume from"),
        (other_model, data_dir, ("--resume", step_dir), "trained on another base model"),
        (
            None,
            data_dir,
            ("--resume", step_dir, "--train.micro_batch_size", "1"),
            "--train.micro_batch_size was 2, now 1",
        ),
        (None, data_dir, ("--resume", step_dir, "--lora_dropout", "0.2"), "--lora_dropout was 0.1, now 0.2"),
        (None, data_dir, ("--resume", step_dir, *ORDER["grouped"]), "--seq.group_by_length was False, now True"),
        (None, other_data, ("--resume", step_dir), "train sample 3 had 120 tokens, now 61"),
    ]
    for number, (checkpoint, data, flags, reason) in enumerate(cases):
        result = cli_here(data, tmp_path / f"out{number}", *FLAGS, *flags, steps=STEPS, checkpoint=checkpoint)
        assert result.returncode == 2, (flags, result.stderr[-3000:])
        assert "error: " in result.stderr and reason in result.stderr, (flags, result.stderr[-3000:])
        assert not (tmp_path / f"out{number}" / "final").exists()
    assert sorted(str(path.relative_to(reference)) for path in reference.rglob("*")) == before


def test_a_sample_edited_at_the_same_token_length_stops_with_exit_2_naming_split_and_sample(
    uninterrupted, cli_here, tiny_checkpoint, data_dir, tmp_path
):
    """One word of train sample 3 swapped for another: the same token lengths, other text to train on."""
    from litgpt.tokenizer import Tokenizer

    step_dir = uninterrupted("random") / "step-000002"
    edited = tmp_path / "edited_data"
    shutil.copytree(data_dir, edited)
    samples = json.loads((edited / "train.json").read_text())
    words = samples[3]["output"].split(" ")
    words[-1] = "the" if words[-1] != "the" else "a"
    before = assets.sample_tokens(samples[3], Tokenizer(tiny_checkpoint))
    samples[3]["output"] = " ".join(words)
    assert assets.sample_tokens(samples[3], Tokenizer(tiny_checkpoint)) == before
    (edited / "train.json").write_text(json.dumps(samples, indent=1))

    out_dir = tmp_path / "out"
    result = cli_here(edited, out_dir, *FLAGS, "--resume", str(step_dir), steps=STEPS)
    assert result.returncode == 2, result.stderr[-3000:]
    assert (
        f"error: cannot resume from {step_dir}: this run differs from the one that saved it: the train split has the"
        f" same token lengths but other content: train sample 3 differs (position 3 of {edited / 'train.json'})."
    ) in result.stderr
    assert not (out_dir / "seq_lengths.json").exists() and not (out_dir / "final").exists()


def test_other_base_weights_of_the_same_config_stop_with_exit_2_naming_checkpoint_dir(
    uninterrupted, cli_here, tiny_checkpoint, data_dir, tmp_path
):
    """Other random weights, same model_config.yaml and the same file size: refused before the scan; a dry run, which
    needs no weights, still resumes."""
    step_dir = uninterrupted("random") / "step-000002"
    other = tmp_path / "other_weights"
    assets.build_tokenizer(other)
    assets.build_checkpoint(other, block_size=512, seed=1)
    assert (other / "model_config.yaml").read_text() == (tiny_checkpoint / "model_config.yaml").read_text()
    size = (other / "lit_model.pth").stat().st_size
    assert size == (tiny_checkpoint / "lit_model.pth").stat().st_size

    out_dir = tmp_path / "out"
    result = cli_here(data_dir, out_dir, *FLAGS, "--resume", str(step_dir), steps=STEPS, checkpoint=other)
    assert result.returncode == 2, result.stderr[-3000:]
    assert (
        f"error: --resume {step_dir}: that checkpoint was trained on other base weights than checkpoint_dir {other}"
        f" ({other / 'lit_model.pth'}: same size ({size} bytes), other bytes in the sampled block at offset 0; it was"
        f" trained from {tiny_checkpoint / 'lit_model.pth'}). Pass the checkpoint_dir it was trained from"
    ) in result.stderr
    assert not (out_dir / "seq_lengths.json").exists() and not (out_dir / "final").exists()

    (other / "lit_model.pth").unlink()
    result = cli_here(
        data_dir, out_dir, *FLAGS, "--resume", str(step_dir), "--seq.dry_run", "true", steps=STEPS, checkpoint=other
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_report(out_dir)["resumed_from"] == {"step_dir": str(step_dir), "step": 2}
