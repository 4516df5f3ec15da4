"""Issue 10 through the real command line: one test per case. Every bad input ends with one `error: ...` paragraph,
exit 2, before the model is built; degenerate outcomes warn; out_dir reuse leaves no disagreeing files.

In process: ``finetune_lora.cli()`` with ``sys.argv`` patched, the exit code from its SystemExit and the output from
capsys (an exception other than SystemExit would fail the test, so "no traceback" holds by construction). Subprocesses
(marked e2e) only where a process boundary matters: Ctrl-C, two runs into one out_dir at once, two devices.
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

import finetune_lora
from helpers import read_report, run_cli

MODEL_BUILT = "Number of trainable parameters"  # printed right after GPT(config): must not appear on bad input


@pytest.fixture
def run(cli_here):
    """run(data_dir, out_dir, *flags, ...) -> (exit code, stdout, stderr) of finetune_lora.cli() in this process."""

    def run_here(*args, **kwargs) -> tuple[int, str, str]:
        done = cli_here(*args, **kwargs)
        return done.returncode, done.stdout, done.stderr

    return run_here


def assert_clear_error(result: tuple[int, str, str], *named: str) -> str:
    code, out, err = result
    assert code == 2, err[-3000:]
    assert "Traceback" not in err and MODEL_BUILT not in out
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [err.splitlines()[0]], err[-3000:]
    for name in named:
        assert name in err, (name, err[-3000:])
    return err


@pytest.fixture
def data_dir(make_data):
    return make_data([100, 120, 90, 110], [95, 105])


# ---------------------------------------------------------------------------------------------------------------
# Data files
# ---------------------------------------------------------------------------------------------------------------


def test_json_path_missing(run, tmp_path):
    missing = tmp_path / "nope.json"
    assert_clear_error(run(missing, tmp_path / "out"), "--data.json_path", str(missing), "does not exist")


def test_file_not_json(run, data_dir, tmp_path):
    (data_dir / "val.json").write_text('[{"instruction": "a", "output": }]')
    assert_clear_error(run(data_dir, tmp_path / "out"), str(data_dir / "val.json"), "not valid JSON", "line 1, column")


def test_file_not_utf8(run, data_dir, tmp_path):
    (data_dir / "train.json").write_bytes('[{"instruction": "caf\xe9", "output": "b"}]'.encode("latin-1"))
    assert_clear_error(run(data_dir, tmp_path / "out"), str(data_dir / "train.json"), "not UTF-8", "line 1")


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("output", None, "'output' = null"),
        ("instruction", None, "'instruction' = null"),
        ("instruction", 42, "'instruction' = a number"),
    ],
)
def test_bad_field(run, data_dir, tmp_path, field, value, named):
    samples = json.loads((data_dir / "train.json").read_text())
    samples[2][field] = value
    (data_dir / "train.json").write_text(json.dumps(samples, indent=1))
    assert_clear_error(run(data_dir, tmp_path / "out"), str(data_dir / "train.json"), "position 2", named)


def test_litgpts_default_val_split_is_one_warning_line(run, data_dir, tmp_path):
    single = tmp_path / "all.json"
    single.write_text(json.dumps(json.loads((data_dir / "train.json").read_text()) * 10))  # 5% of it: 2 val samples
    code, _, err = run(single, tmp_path / "out", "--seq.dry_run", "true")
    assert code == 0, err[-3000:]
    assert "warning: The `json_path` points to a single file and `val_split_fraction` was not set." in err
    assert "UserWarning" not in err


def test_top_level_object(run, data_dir, tmp_path):
    single = tmp_path / "all.json"
    single.write_text(json.dumps({"train": json.loads((data_dir / "train.json").read_text()), "val": []}))
    result = run(single, tmp_path / "out", "--data.val_split_fraction", "0.2")
    assert_clear_error(result, str(single), "top level must be a list of objects", "'train', 'val'")


# ---------------------------------------------------------------------------------------------------------------
# Settings, upstream's included
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--eval.interval", "0"], "--eval.interval"),
        (["--train.micro_batch_size", "0"], "--train.micro_batch_size"),
        (["--train.micro_batch_size", "-2"], "--train.micro_batch_size"),
        (["--train.global_batch_size", "3"], "--train.global_batch_size 3"),
        (["--seq.scan_workers", "-1"], "--seq.scan_workers"),
        (["--train.lr_warmup_fraction", "0.1"], "--train.lr_warmup_fraction"),
        (
            ["--optimizer", "Adamw"],
            "--optimizer 'Adamw' is not an optimizer class litgpt can import. Did you mean AdamW?",
        ),
        (["--optimizer.lr", "0.01"], "--optimizer AdamW --optimizer.lr 0.01"),
        (
            ["--train.max_steps", "2", "--train.lr_warmup_steps", "2"],
            "--train.lr_warmup_steps 2 equals the run's 2 optimizer steps",
        ),
    ],
)
def test_bad_setting(run, data_dir, tmp_path, flags, named):
    assert_clear_error(run(data_dir, tmp_path / "out", *flags), named)


def test_out_dir_under_a_file(run, data_dir, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_clear_error(run(data_dir, blocker / "out"), "--out_dir", str(blocker))


def test_quantize_without_bitsandbytes(run, data_dir, tmp_path):
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip(
            "tests the error --quantize gives without bitsandbytes, which is installed here; run it where it is not"
        )
    result = run(data_dir, tmp_path / "out", "--quantize", "bnb.nf4", "--precision", "bf16-true")
    assert_clear_error(result, "--quantize bnb.nf4", "bitsandbytes")


def test_warmup_above_the_run_warns_as_litgpt_runs_it(run, data_dir, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = run(data_dir, out, "--train.lr_warmup_steps", "5", "--seq.dry_run", "true")
    assert code == 0, err[-3000:]
    assert "warning: --train.lr_warmup_steps 5 is above the run's 2 optimizer steps" in stdout
    assert [w["kind"] for w in read_report(out)["warnings"]] == ["warmup_beyond_run"]


def test_warmup_zero_means_no_warmup_and_a_dry_run_then_leaves_the_trained_report(run, data_dir, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = run(data_dir, out, "--train.lr_warmup_steps", "0")
    assert code == 0 and MODEL_BUILT in stdout, err[-3000:]
    trained = (out / "seq_lengths.json").read_text()
    assert json.loads(trained)["dry_run"] is False
    code, stdout, err = run(data_dir, out, "--train.max_seq_length", "128", "--seq.dry_run", "true")
    assert code == 0, err[-3000:]
    assert (out / "seq_lengths.json").read_text() == trained
    assert json.loads((out / "seq_lengths.dry_run.json").read_text())["max_seq_length"] == 128
    assert "seq_lengths.dry_run.json" in stdout
    code, stdout, err = run(data_dir, out)  # a rerun: says what it replaces, removes the dry-run report
    assert code == 0, err[-3000:]
    assert f"warning: out_dir {str(out)!r} holds final, step-000002 from an earlier run" in stdout  # its last step too
    assert not (out / "seq_lengths.dry_run.json").exists()


# ---------------------------------------------------------------------------------------------------------------
# Over-length samples: named by their place in the user's file, advice that can help
# ---------------------------------------------------------------------------------------------------------------


def single_file_with_a_long_sample(make_data, tmp_path) -> tuple[Path, int]:
    """One file of 20 samples of 100 tokens and one of 295 at position 10."""
    directory = make_data([100] * 10 + [295] + [100] * 9, [100])
    single = tmp_path / "all.json"
    single.write_text(json.dumps(json.loads((directory / "train.json").read_text()), indent=1))
    return single, 10


def test_over_length_error_names_the_position_in_the_users_file(run, make_data, tmp_path):
    single, position = single_file_with_a_long_sample(make_data, tmp_path)
    flags = ("--data.val_split_fraction", "0.2", "--train.max_seq_length", "200", "--seq.over_length", "error")
    err = assert_clear_error(run(single, tmp_path / "out", *flags), f"(position {position} of {single})", "= 295")
    assert "--seq.headroom" not in err  # it does nothing under an override
    assert "Raise --train.max_seq_length (up to block_size 512)" in err


def test_dropped_samples_name_the_position_in_the_users_file(run, make_data, tmp_path):
    single, position = single_file_with_a_long_sample(make_data, tmp_path)
    out = tmp_path / "out"
    flags = ("--data.val_split_fraction", "0.2", "--train.max_seq_length", "200", "--seq.over_length", "drop")
    code, _, err = run(single, out, *flags, "--seq.dry_run", "true")
    assert code == 0, err[-3000:]
    (dropped,) = [json.loads(line) for line in (out / "dropped_samples.jsonl").read_text().splitlines()]
    assert (dropped["file"], dropped["position"], dropped["length"]) == (str(single), position, 295)
    assert dropped["split"] == "train" and dropped["index"] != position  # the split's own index differs


def test_capped_over_length_error_does_not_advise_raising(run, make_data, tmp_path):
    err = assert_clear_error(
        run(make_data([600, 100], [100]), tmp_path / "out", "--seq.over_length", "error"), "block_size 512"
    )
    assert "raise" not in err.lower() and "--seq.headroom" not in err


# ---------------------------------------------------------------------------------------------------------------
# Degenerate outcomes warn, on screen and in seq_lengths.json
# ---------------------------------------------------------------------------------------------------------------


def test_max_seq_length_below_the_template_warns(run, data_dir, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = run(data_dir, out, "--train.max_seq_length", "20", "--seq.dry_run", "true")
    assert code == 0, err[-3000:]
    assert "warning: max_seq_length 20 leaves no room for a response: the prompt template alone takes" in stdout
    kinds = {w["kind"] for w in read_report(out)["warnings"]}
    assert {"shorter_than_template", "cut_share"} <= kinds


def test_max_seq_length_one_leaves_nothing_to_learn_and_names_the_samples(run, make_data, tmp_path):
    single, _ = single_file_with_a_long_sample(make_data, tmp_path)
    result = run(single, tmp_path / "out", "--data.val_split_fraction", "0.2", "--train.max_seq_length", "1")
    assert_clear_error(result, "no token to learn from", f"of {single})")


def test_samples_left_without_a_target_are_named_in_a_warning(run, tmp_path):
    """Under mask_prompt, a sample whose template alone fills max_seq_length keeps no target: it is left out and named.
    Alpaca's template takes 25 tokens without an input and 39 with one (with this tokenizer), so at 32 the samples with
    an input (positions 1 and 3 of the file) have none."""
    plain = {"instruction": "the model learns", "input": "", "output": "from the data"}
    with_input = {"instruction": "the model", "input": "learns from", "output": "the data"}
    single = tmp_path / "all.json"
    single.write_text(json.dumps([plain, with_input, plain, with_input, plain, plain]))
    out = tmp_path / "out"
    flags = ("--data.mask_prompt", "true", "--train.max_seq_length", "32", "--seq.dry_run", "true")
    code, stdout, err = run(
        tmp_path / "d", out, "--data.json_path", str(single), "--data.val_split_fraction", "0.2", *flags
    )
    assert code == 0, err[-3000:]
    found = [w for w in read_report(out)["warnings"] if w["kind"] == "no_supervised_token"]
    named = " ".join(w["message"] for w in found)
    assert (
        sum(w["count"] for w in found) == 2
        and f"position 1 of {single}" in named
        and f"position 3 of {single}" in named
    )
    assert all("warning: " + w["message"] in stdout for w in found)


def test_dropping_most_of_val_warns(run, make_data, tmp_path):
    out = tmp_path / "out"
    data = make_data([100, 110, 120], [300, 310, 320, 330, 340, 350, 360, 100])
    code, stdout, err = run(
        data, out, "--train.max_seq_length", "200", "--seq.over_length", "drop", "--seq.dry_run", "true"
    )
    assert code == 0, err[-3000:]
    assert "warning: --seq.over_length drop leaves out 7 of 8 val samples" in stdout
    assert [(w["split"], w["count"]) for w in read_report(out)["warnings"] if w["kind"] == "cut_share"] == [("val", 7)]


def test_a_clean_run_has_no_warnings(run, data_dir, tmp_path):
    out = tmp_path / "out"
    code, stdout, err = run(data_dir, out, "--seq.dry_run", "true")
    assert code == 0 and "warning:" not in stdout + err, stdout + err
    assert read_report(out)["warnings"] == [] and read_report(out)["dry_run"] is True


# ---------------------------------------------------------------------------------------------------------------
# out_dir reuse
# ---------------------------------------------------------------------------------------------------------------


def test_no_dropped_file_left_from_an_earlier_run(run, data_dir, tmp_path):
    out = tmp_path / "out"
    flags = ("--train.max_seq_length", "105", "--seq.dry_run", "true")
    assert run(data_dir, out, *flags, "--seq.over_length", "drop")[0] == 0
    assert (out / "dropped_samples.jsonl").exists()
    assert run(data_dir, out, *flags, "--seq.over_length", "truncate")[0] == 0
    assert not (out / "dropped_samples.jsonl").exists()


def test_a_lock_left_by_a_dead_run_is_taken_over(run, data_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(
        json.dumps({"pid": dead.pid, "host": os.uname().nodename, "started": "2025-01-01T00:00:00+00:00"})
    )
    code, _, err = run(data_dir, out, "--seq.dry_run", "true")
    assert code == 0 and f"pid {dead.pid}" in err and "taking it over" in err, err[-3000:]
    assert not (out / ".lock").exists()


def test_help_describes_max_seq_length_as_an_override(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["finetune_lora.py", "--help"])
    with pytest.raises(SystemExit) as leaving:
        finetune_lora.cli()
    text = " ".join(capsys.readouterr().out.split())
    assert leaving.value.code == 0
    assert "Override of the max_seq_length decided from the data" in text and "Limits the length of samples" not in text
    assert "seq_lengths.dry_run.json" in text and "with its file and position" in text  # --seq.* help


# ---------------------------------------------------------------------------------------------------------------
# Bad input of every kind, the checkpoint's included (moved here from test_cli.py: in process, same assertions)
# ---------------------------------------------------------------------------------------------------------------


def test_drop_that_empties_a_split_is_an_error(cli_here, make_data, tmp_path):
    run = cli_here(
        make_data([100, 300], [250, 260]),
        tmp_path / "out",
        "--train.max_seq_length",
        "200",
        "--seq.over_length",
        "drop",
    )
    assert run.returncode == 2
    assert "val split empty" in run.stderr and "Traceback" not in run.stderr


def test_error_policy_stops_before_weights_are_read(cli_here, tiny_checkpoint, make_data, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, checkpoint)
    (checkpoint / "lit_model.pth").write_bytes(b"not a checkpoint")  # any attempt to load it would fail differently
    out = tmp_path / "out"
    run = cli_here(
        make_data([100, 300, 280], [250, 95]),
        out,
        "--train.max_seq_length",
        "200",
        "--seq.over_length",
        "error",
        checkpoint=checkpoint,
    )
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    for fragment in (
        "3 sample(s)",
        "train[1] = 300",
        "train[2] = 280",
        "val[0] = 250",
        "max_seq_length 200",
        "--seq.over_length",
    ):
        assert fragment in run.stderr, fragment
    assert not (out / "final").exists()


def test_dry_run_needs_no_weights(cli_here, tiny_checkpoint, make_data, tmp_path):
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, checkpoint)
    (checkpoint / "lit_model.pth").unlink()
    data = make_data([100, 300], [250, 95])
    ok = cli_here(data, tmp_path / "ok", "--seq.dry_run", "true", checkpoint=checkpoint)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert read_report(tmp_path / "ok")["max_seq_length"] == 330
    assert not (tmp_path / "ok" / "final").exists()
    gate = cli_here(
        data,
        tmp_path / "gate",
        "--seq.dry_run",
        "true",
        "--train.max_seq_length",
        "256",
        "--seq.over_length",
        "error",
        checkpoint=checkpoint,
    )
    assert gate.returncode == 2 and "train[1] = 300" in gate.stderr
    missing = cli_here(data, tmp_path / "missing", checkpoint=checkpoint)
    assert missing.returncode == 2 and "lit_model.pth" in missing.stderr and "Traceback" not in missing.stderr


def without(data: Path, split: str, index: int, field: str) -> None:
    samples = json.loads((data / f"{split}.json").read_text())
    del samples[index][field]
    (data / f"{split}.json").write_text(json.dumps(samples))


@pytest.mark.parametrize(
    "case, flags, expected",
    [
        ("negative headroom", ["--seq.headroom", "-0.5"], ["--seq.headroom", "-0.5"]),
        ("zero override", ["--train.max_seq_length", "0"], ["--train.max_seq_length", "0"]),
        ("empty train", [], ["train split", "empty"]),
        ("empty val", [], ["val split", "empty"]),
        ("no instruction", [], ["val.json: the sample at position 1", "no field 'instruction'"]),
        ("no output", [], ["train.json: the sample at position 2", "no field 'output'"]),
        ("no model_config.yaml", [], ["model_config.yaml"]),
        ("no tokenizer", [], ["tokenizer.json or tokenizer.model"]),
    ],
)
def test_bad_input_is_a_clear_error(cli_here, tiny_checkpoint, make_data, tmp_path, case, flags, expected):
    data = make_data([100, 120, 130], [110, 90])
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, checkpoint)
    if case.startswith("empty"):
        (data / f"{case.split()[1]}.json").write_text("[]")
    elif case == "no instruction":
        without(data, "val", 1, "instruction")
    elif case == "no output":
        without(data, "train", 2, "output")
    elif case == "no model_config.yaml":
        (checkpoint / "model_config.yaml").unlink()
    elif case == "no tokenizer":
        (checkpoint / "tokenizer.json").unlink()
    out = tmp_path / "out"
    run = cli_here(data, out, *flags, checkpoint=checkpoint)
    assert run.returncode == 2, (run.stdout[-2000:], run.stderr[-2000:])
    assert "Traceback" not in run.stderr
    for fragment in expected:
        assert fragment in run.stderr, (fragment, run.stderr[-2000:])
    assert not (out / "final").exists()


# ---------------------------------------------------------------------------------------------------------------
# The checkpoint's files, the data module, the logger: refused before the model is built (the weights are unreadable,
# so reading them would fail differently)
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def checkpoint(tiny_checkpoint, tmp_path) -> Path:
    """A copy of the tiny checkpoint whose lit_model.pth cannot be loaded."""
    copy = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint, copy)
    (copy / "lit_model.pth").write_bytes(b"not a checkpoint")
    return copy


def test_negative_num_workers(run, data_dir, tmp_path, checkpoint):
    result = run(data_dir, tmp_path / "out", "--data.num_workers", "-1", checkpoint=checkpoint)
    assert_clear_error(result, "--data.num_workers must be a whole number >= 0", "got -1")


def test_tokenizer_json_that_is_not_json(run, data_dir, tmp_path, checkpoint):
    (checkpoint / "tokenizer.json").write_text('{"model": {"vocab": ')
    result = run(data_dir, tmp_path / "out", checkpoint=checkpoint)
    assert_clear_error(result, f"{checkpoint / 'tokenizer.json'} is not valid JSON", "line 1, column 21")


def test_unknown_key_in_model_config(run, data_dir, tmp_path, checkpoint):
    with (checkpoint / "model_config.yaml").open("a") as config:
        config.write("attention_flavour: sparse\n")
    result = run(data_dir, tmp_path / "out", checkpoint=checkpoint)
    assert_clear_error(result, str(checkpoint / "model_config.yaml"), "does not know: attention_flavour")


@pytest.mark.parametrize(("logger", "package"), [("tensorboard", "tensorboard"), ("wandb", "wandb")])
def test_logger_without_its_package(run, data_dir, tmp_path, checkpoint, logger, package):
    import importlib.util

    if importlib.util.find_spec(package) is not None:
        pytest.skip(
            f"tests the error --logger_name {logger} gives without {package}, which is installed here; run it where it is not"
        )
    result = run(data_dir, tmp_path / "out", "--logger_name", logger, checkpoint=checkpoint)
    assert_clear_error(result, f"--logger_name {logger} needs the {package}", f"pip install {package}")


def test_tokenizer_ids_beyond_the_models_vocabulary(run, data_dir, tmp_path, checkpoint):
    """A tokenizer with more words than the model's embedding has rows: the samples' words would get ids past it."""
    import assets

    assets.build_tokenizer(checkpoint, extra_words=[f"zz{i:02d}" for i in range(40)])
    result = run(data_dir, tmp_path / "out", checkpoint=checkpoint)
    assert_clear_error(result, "has token ids up to 116", "for ids below 77 only (padded_vocab_size")


def test_alpaca_without_network_names_the_url_and_local_files(run, data_dir, tmp_path, checkpoint, monkeypatch):
    import requests
    from litgpt.data.alpaca import _URL

    def no_network(*args, **kwargs):
        raise requests.exceptions.ConnectionError("Failed to resolve 'raw.githubusercontent.com'")

    monkeypatch.setattr(requests, "get", no_network)
    download_dir = tmp_path / "alpaca"
    result = run(data_dir, tmp_path / "out", "--data", "Alpaca", "--data.download_dir", str(download_dir),
                 checkpoint=checkpoint)  # fmt: skip
    err = assert_clear_error(result, f"could not download its data from {_URL}", "ConnectionError", "--data JSON")
    assert str(download_dir / "alpaca_data_cleaned_archive.json") in err


def test_unknown_prompt_style_names_the_flag_and_the_styles(run, data_dir, tmp_path, checkpoint):
    result = run(data_dir, tmp_path / "out", "--data.prompt_style", "chatml", checkpoint=checkpoint)
    assert_clear_error(result, "--data.prompt_style 'chatml' is not a prompt style", "alpaca, codellama", "llama3")


def test_packing_with_batch_weighting_is_refused(run, data_dir, tmp_path, checkpoint):
    result = run(
        data_dir, tmp_path / "out", "--seq.pack", "true", "--seq.loss_weighting", "batch", checkpoint=checkpoint
    )
    assert_clear_error(result, "--seq.pack true and --seq.loss_weighting batch exclude each other")


def test_a_split_in_two_formats_is_refused(run, data_dir, tmp_path, checkpoint):
    samples = json.loads((data_dir / "val.json").read_text())
    (data_dir / "val.jsonl").write_text("".join(json.dumps(sample) + "\n" for sample in samples))
    result = run(data_dir, tmp_path / "out", checkpoint=checkpoint)
    assert_clear_error(result, f"{str(data_dir)!r} holds both val.json and val.jsonl")


# ---------------------------------------------------------------------------------------------------------------
# Across processes
# ---------------------------------------------------------------------------------------------------------------


def wait_for(path: Path, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


@pytest.mark.e2e
def test_a_second_run_into_an_out_dir_in_use_stops_and_ctrl_c_ends_the_first_in_one_line(
    tiny_checkpoint, data_dir, tmp_path, cli_here
):
    """Two processes, one out_dir: the second (this one) stops at once naming the first; then Ctrl-C on the first,
    mid-training, is one line and exit 130, and its lock is gone."""
    out = tmp_path / "out"
    first = {}
    thread = threading.Thread(
        target=lambda: first.update(
            run=run_cli(tiny_checkpoint, data_dir, out, "--train.epochs", "100000", steps=100_000)
        )
    )
    thread.start()
    try:
        wait_for(out / "seq_lengths.json")  # the first run holds the lock and is past its plan
        holder = json.loads((out / ".lock").read_text())["pid"]
        second = cli_here(data_dir, out)
        assert second.returncode == 2 and "Traceback" not in second.stderr, second.stderr[-3000:]
        assert second.stderr.startswith(f"error: out_dir {str(out)!r} is in use by pid {holder}"), second.stderr[-3000:]
        os.kill(holder, signal.SIGINT)
    finally:
        thread.join()
    ended = first["run"]
    assert ended.returncode == 130 and "Traceback" not in ended.stderr, ended.stderr[-3000:]
    assert ended.stderr.strip().splitlines()[-1] == "interrupted (Ctrl-C)"
    assert not (out / ".lock").exists()
