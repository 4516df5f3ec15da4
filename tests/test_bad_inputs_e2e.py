"""Issue 10 end to end: the real CLI in a subprocess, one test per case. Every bad input ends with one `error: ...`
paragraph on stderr, exit 2, no traceback, before the model is built; out_dir reuse leaves no disagreeing files.

These tests FAIL until input_checks, run_lock and cli_support are wired into finetune_lora.py (see INTEGRATION.md).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, read_report, run_cli

pytestmark = pytest.mark.e2e

MODEL_BUILT = "Number of trainable parameters"  # printed right after GPT(config): must not appear on bad input


def assert_clear_error(run: subprocess.CompletedProcess, *named: str) -> str:
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr and MODEL_BUILT not in run.stdout
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, run.stderr[-3000:]
    for name in named:
        assert name in run.stderr, (name, run.stderr[-3000:])
    return run.stderr


@pytest.fixture
def data_dir(make_data):
    return make_data([100, 120, 90, 110], [95, 105])


def test_json_path_missing(tiny_checkpoint, tmp_path):
    missing = tmp_path / "nope.json"
    assert_clear_error(run_cli(tiny_checkpoint, missing, tmp_path / "out"), "--data.json_path", str(missing))


def test_file_not_json(tiny_checkpoint, data_dir, tmp_path):
    (data_dir / "val.json").write_text('[{"instruction": "a", "output": }]')
    assert_clear_error(run_cli(tiny_checkpoint, data_dir, tmp_path / "out"), str(data_dir / "val.json"), "not valid JSON", "line 1, column")


def test_file_not_utf8(tiny_checkpoint, data_dir, tmp_path):
    (data_dir / "train.json").write_bytes('[{"instruction": "caf\xe9", "output": "b"}]'.encode("latin-1"))
    assert_clear_error(run_cli(tiny_checkpoint, data_dir, tmp_path / "out"), str(data_dir / "train.json"), "not UTF-8", "line 1")


@pytest.mark.parametrize(("field", "value", "named"), [("output", None, "'output' = null"), ("instruction", None, "'instruction' = null"), ("instruction", 42, "'instruction' = a number")])
def test_bad_field(tiny_checkpoint, data_dir, tmp_path, field, value, named):
    samples = json.loads((data_dir / "train.json").read_text())
    samples[2][field] = value
    (data_dir / "train.json").write_text(json.dumps(samples, indent=1))
    assert_clear_error(run_cli(tiny_checkpoint, data_dir, tmp_path / "out"), str(data_dir / "train.json"), "position 2", named)


def test_top_level_object(tiny_checkpoint, data_dir, tmp_path):
    single = tmp_path / "all.json"
    single.write_text(json.dumps({"train": json.loads((data_dir / "train.json").read_text()), "val": []}))
    run = run_cli(tiny_checkpoint, single, tmp_path / "out", "--data.val_split_fraction", "0.2")
    assert_clear_error(run, "top level must be a list of objects", "'train', 'val'")


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--eval.interval", "0"], "--eval.interval"),
        (["--train.micro_batch_size", "0"], "--train.micro_batch_size"),
        (["--train.micro_batch_size", "-2"], "--train.micro_batch_size"),
        (["--train.global_batch_size", "3"], "--train.global_batch_size 3"),
        (["--seq.scan_workers", "-1"], "--seq.scan_workers"),
        (["--train.lr_warmup_fraction", "0.1"], "--train.lr_warmup_fraction"),
        (["--train.max_steps", "2", "--train.lr_warmup_steps", "2"], "--train.lr_warmup_steps 2 is not below the run's 2 optimizer steps"),
        (["--train.max_steps", "2", "--train.lr_warmup_steps", "5"], "--train.lr_warmup_steps 5"),
    ],
)
def test_bad_setting(tiny_checkpoint, data_dir, tmp_path, flags, named):
    assert_clear_error(run_cli(tiny_checkpoint, data_dir, tmp_path / "out", *flags), named)


def test_warmup_zero_means_no_warmup(tiny_checkpoint, data_dir, tmp_path):
    run = run_cli(tiny_checkpoint, data_dir, tmp_path / "out", "--train.lr_warmup_steps", "0")
    assert run.returncode == 0, run.stderr[-3000:]


def test_out_dir_under_a_file(tiny_checkpoint, data_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_clear_error(run_cli(tiny_checkpoint, data_dir, blocker / "out"), "--out_dir", str(blocker))


def test_quantize_without_bitsandbytes(tiny_checkpoint, data_dir, tmp_path):
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed")
    run = run_cli(tiny_checkpoint, data_dir, tmp_path / "out", "--quantize", "bnb.nf4", "--precision", "bf16-true")
    assert_clear_error(run, "--quantize bnb.nf4", "bitsandbytes")


def single_file_with_a_long_sample(make_data, tmp_path) -> tuple[Path, int]:
    """One file of 20 samples of 100 tokens and one of 295 at position 10 (the issue's case)."""
    lengths = [100] * 10 + [295] + [100] * 9
    directory = make_data(lengths, [100])
    single = tmp_path / "all.json"
    single.write_text(json.dumps(json.loads((directory / "train.json").read_text()), indent=1))
    return single, 10


def test_over_length_error_names_the_position_in_the_users_file(tiny_checkpoint, make_data, tmp_path):
    single, position = single_file_with_a_long_sample(make_data, tmp_path)
    run = run_cli(tiny_checkpoint, single, tmp_path / "out", "--data.val_split_fraction", "0.2", "--train.max_seq_length", "200", "--seq.over_length", "error")
    stderr = assert_clear_error(run, f"position {position} of {single}", "295")
    assert "--seq.headroom" not in stderr  # it does nothing under an override


def test_dropped_samples_name_the_position_in_the_users_file(tiny_checkpoint, make_data, tmp_path):
    single, position = single_file_with_a_long_sample(make_data, tmp_path)
    out = tmp_path / "out"
    run = run_cli(tiny_checkpoint, single, out, "--data.val_split_fraction", "0.2", "--train.max_seq_length", "200", "--seq.over_length", "drop", "--seq.dry_run", "true")
    assert run.returncode == 0, run.stderr[-3000:]
    (dropped,) = [json.loads(line) for line in (out / "dropped_samples.jsonl").read_text().splitlines()]
    assert (dropped["file"], dropped["position"], dropped["length"]) == (str(single), position, 295)


def test_capped_over_length_error_does_not_advise_raising(tiny_checkpoint, make_data, tmp_path):
    run = run_cli(tiny_checkpoint, make_data([600, 100], [100]), tmp_path / "out", "--seq.over_length", "error")
    stderr = assert_clear_error(run, "block_size 512")
    assert "raise the limit" not in stderr.lower() and "--seq.headroom" not in stderr


def test_max_seq_length_one_warns(tiny_checkpoint, data_dir, tmp_path):
    out = tmp_path / "out"
    run = run_cli(tiny_checkpoint, data_dir, out, "--train.max_seq_length", "1", "--seq.dry_run", "true")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "warning: " in run.stdout + run.stderr and "no room for a response" in run.stdout + run.stderr
    kinds = {w["kind"] for w in read_report(out)["warnings"]}
    assert {"shorter_than_template", "no_supervised_token", "cut_share"} <= kinds


def test_dropping_most_of_val_warns(tiny_checkpoint, make_data, tmp_path):
    out = tmp_path / "out"
    run = run_cli(tiny_checkpoint, make_data([100, 110, 120], [300, 310, 320, 330, 340, 350, 360, 100]), out,
                  "--train.max_seq_length", "200", "--seq.over_length", "drop", "--seq.dry_run", "true")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "warning: --seq.over_length drop leaves out 7 of 8 val samples" in run.stdout + run.stderr
    assert [(w["split"], w["count"]) for w in read_report(out)["warnings"] if w["kind"] == "cut_share"] == [("val", 7)]


def test_dry_run_does_not_overwrite_a_trained_report(tiny_checkpoint, data_dir, tmp_path):
    out = tmp_path / "out"
    assert run_cli(tiny_checkpoint, data_dir, out).returncode == 0
    trained = (out / "seq_lengths.json").read_text()
    run = run_cli(tiny_checkpoint, data_dir, out, "--train.max_seq_length", "128", "--seq.dry_run", "true")
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "seq_lengths.json").read_text() == trained
    assert json.loads((out / "seq_lengths.dry_run.json").read_text())["max_seq_length"] == 128


def test_no_dropped_file_left_from_an_earlier_run(tiny_checkpoint, data_dir, tmp_path):
    out = tmp_path / "out"
    flags = ("--train.max_seq_length", "105", "--seq.dry_run", "true")
    assert run_cli(tiny_checkpoint, data_dir, out, *flags, "--seq.over_length", "drop").returncode == 0
    assert (out / "dropped_samples.jsonl").exists()
    assert run_cli(tiny_checkpoint, data_dir, out, *flags, "--seq.over_length", "truncate").returncode == 0
    assert not (out / "dropped_samples.jsonl").exists()


def wait_for(path: Path, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def test_second_run_into_an_out_dir_in_use_stops_at_once(tiny_checkpoint, data_dir, tmp_path):
    out = tmp_path / "out"
    first = {}
    thread = threading.Thread(target=lambda: first.update(run=run_cli(tiny_checkpoint, data_dir, out, steps=40)))
    thread.start()
    try:
        wait_for(out / ".lock")
        holder = json.loads((out / ".lock").read_text())["pid"]
        second = run_cli(tiny_checkpoint, data_dir, out)
        assert_clear_error(second, f"out_dir {str(out)!r} is in use by pid {holder}")
    finally:
        thread.join()
    assert first["run"].returncode == 0, first["run"].stderr[-3000:]
    assert not (out / ".lock").exists()


def test_ctrl_c_is_one_line_and_exit_130(tiny_checkpoint, data_dir, tmp_path):
    out = tmp_path / "out"
    result = {}
    thread = threading.Thread(target=lambda: result.update(run=run_cli(tiny_checkpoint, data_dir, out, steps=100_000)))
    thread.start()
    wait_for(out / "seq_lengths.json")
    time.sleep(1)
    os.kill(json.loads((out / ".lock").read_text())["pid"], signal.SIGINT)
    thread.join()
    run = result["run"]
    assert run.returncode == 130 and run.stderr.strip().splitlines()[-1] == "interrupted (Ctrl-C)", run.stderr[-3000:]
    assert "Traceback" not in run.stderr and not (out / ".lock").exists()


def test_help_describes_max_seq_length_as_an_override():
    run = subprocess.run([sys.executable, str(ROOT / "finetune_lora.py"), "--help"], capture_output=True, text=True, timeout=120)
    text = " ".join(run.stdout.split())
    assert run.returncode == 0 and "Override of the max_seq_length decided from the data" in text and "Limits the length of samples" not in text


def test_two_devices_print_an_error_once(tiny_checkpoint, data_dir, tmp_path):
    run = run_cli(tiny_checkpoint, data_dir, tmp_path / "out", "--devices", "2", "--train.global_batch_size", "4",
                  "--train.max_seq_length", "100", "--seq.over_length", "error")
    assert run.returncode == 2 and run.stderr.count("error: ") == 1, run.stderr[-3000:]


def test_rerun_leaves_no_stale_lock_after_kill(tiny_checkpoint, data_dir, tmp_path):
    """A run killed with -9 leaves its .lock; the next run takes it over with a warning and completes."""
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename, "started": "2025-01-01T00:00:00+00:00"}))
    run = run_cli(tiny_checkpoint, data_dir, out)
    assert run.returncode == 0 and f"pid {dead.pid}" in run.stderr and "taking it over" in run.stderr
    shutil.rmtree(out)
