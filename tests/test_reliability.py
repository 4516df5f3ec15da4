"""Nothing a user spent is lost: a finished training is on disk before the final validation, evaluation never changes
the trained weights, a non-finite loss stops the run before it writes a bad model, a closed stdout ends quietly."""

import json
import os
import subprocess
import sys

import pytest
import torch

import finetune_lora
from helpers import ROOT, cli_args
from litgpt_seqlen.checkpoint import lookup

ADAMW_HOT = '{"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.1}}'


def lora(out_dir) -> dict:
    return torch.load(out_dir / "final" / "lit_model.pth.lora", weights_only=True)["model"]


def test_a_signal_during_the_final_validation_leaves_the_trained_weights_resumable(
    cli_here, make_data, tmp_path, monkeypatch
):
    data, out = make_data([100, 120, 90, 80], [110, 90]), tmp_path / "out"

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # what Ctrl-C raises, here in the middle of the final validation

    monkeypatch.setattr(finetune_lora.evaluation, "final_validation", interrupted)
    run = cli_here(data, out, steps=3)
    assert run.returncode == 130 and run.stderr.strip().endswith("interrupted (Ctrl-C)")
    assert not (out / "final").exists()
    assert lookup.incomplete_reason(out / "step-000003") is None  # the last step, saved before the validation
    monkeypatch.undo()

    resumed = cli_here(data, out, "--resume", "auto", steps=3)
    assert resumed.returncode == 0, resumed.stderr
    assert "Resuming training from" in resumed.stdout and (out / "final" / "lit_model.pth").is_file()

    # Once more: the run is finished, and its files stay as they are.
    files = {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in out.rglob("*") if path.is_file()}
    again = cli_here(data, out, "--resume", "auto", steps=3)
    assert again.returncode == 0, again.stderr
    assert f"The run in {out} is finished: step 3 of 3" in again.stdout and "Resuming" in again.stdout
    assert "Rehears" not in again.stdout and "Validating" not in again.stdout
    assert {path: (path.stat().st_mtime_ns, path.read_bytes()) for path in out.rglob("*") if path.is_file()} == files
    uninterrupted = tmp_path / "uninterrupted"
    assert cli_here(data, uninterrupted, steps=3).returncode == 0
    assert all(torch.equal(value, lora(uninterrupted)[key]) for key, value in lora(out).items())


def test_evaluation_settings_never_change_the_trained_weights(cli_here, make_data, tmp_path):
    """LoRA dropout draws from the random state; validation and the generated example must not."""
    data = make_data([100, 120, 90, 80, 70, 60], [110, 90])
    flags = ("--lora_dropout", "0.3", "--eval.max_new_tokens", "6")
    rarely = cli_here(data, tmp_path / "rarely", *flags, "--eval.interval", "1000", steps=4)
    often = cli_here(
        data, tmp_path / "often", *flags, "--eval.interval", "1", "--eval.evaluate_example", "random", steps=4
    )
    assert rarely.returncode == often.returncode == 0, often.stderr
    assert often.stdout.count("val loss") >= 4
    first, second = lora(tmp_path / "rarely"), lora(tmp_path / "often")
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_a_non_finite_loss_stops_the_run_and_writes_no_bad_model(cli_here, make_data, tmp_path):
    data, out = make_data([100, 120, 90, 80], [110, 90]), tmp_path / "out"
    run = cli_here(
        data, out, "--precision", "16-true", "--optimizer", ADAMW_HOT, "--train.save_interval", "1", steps=12
    )
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert "warning: --precision 16-true on CPU" in run.stderr
    message = run.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and " at optimizer step " in message and "--precision 16-true" in message
    bad_step = int(message.split("optimizer step ")[1].split(":")[0])
    assert not (out / "final").exists()
    saved = sorted(path.name for path in out.glob("step-*"))
    assert saved == [f"step-{step:06d}" for step in range(1, bad_step)]  # every good step, none after
    for name in saved:
        assert lookup.incomplete_reason(out / name) is None
        weights = torch.load(out / name / "lit_model.pth.lora", weights_only=True)["model"]
        assert all(torch.isfinite(value.float()).all() for value in weights.values())


@pytest.mark.e2e
def test_a_closed_stdout_ends_the_dry_run_quietly_with_the_report_written(tiny_checkpoint, make_data, tmp_path):
    """As under `... | head -3`, the reader of stdout is gone: here from the start, so the first line meets it."""
    out = tmp_path / "out"
    flags = cli_args(make_data([100, 120], [110, 90]), out, "--seq.dry_run", "true")
    read, write = os.pipe()
    os.close(read)
    try:
        run = subprocess.run(
            [sys.executable, str(ROOT / "finetune_lora.py"), str(tiny_checkpoint), *flags],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    finally:
        os.close(write)
    assert "Traceback" not in run.stderr and "BrokenPipeError" not in run.stderr, run.stderr[-2000:]
    assert run.returncode == 141  # 128 + SIGPIPE, as for any command whose reader went away
    report = json.loads((out / "seq_lengths.json").read_text())
    assert report["dry_run"] is True and (out / "seq_lengths.png").is_file()


def test_a_dry_run_does_not_announce_the_precision_it_does_not_train_with(caplog):
    import logging

    from lightning_utilities.core.rank_zero import rank_zero_info

    from litgpt_seqlen import devices

    with caplog.at_level(logging.INFO):
        with devices.quiet_for(True):
            rank_zero_info("Using bfloat16 Automatic Mixed Precision (AMP)")
        with devices.quiet_for(False):
            rank_zero_info("Using bfloat16 Automatic Mixed Precision (AMP), training")
    assert [record.getMessage() for record in caplog.records] == [
        "Using bfloat16 Automatic Mixed Precision (AMP), training"
    ]
