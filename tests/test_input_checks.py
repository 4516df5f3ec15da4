"""Bad settings, bad data files and degenerate outcomes: each gets a message that names the flag, file, split, position
in the user's file and field. References: litgpt's own code (its scheduler, JSON module, SFTDataset, validate_args,
select_sft_generate_example) shows that what is refused really fails there, and what is accepted really works."""

import json
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from litgpt.args import EvalArgs, TrainArgs
from litgpt.data import JSON, SFTDataset
from litgpt.prompts import Alpaca
from litgpt.tokenizer import Tokenizer

import data_utils
from litgpt_seqlen.args import SeqArgs
from litgpt_seqlen.cli import parser as cli_parser
from litgpt_seqlen.cli.parser import build_parser
from litgpt_seqlen.data import files, length_plan
from litgpt_seqlen.errors import UserInputError
from litgpt_seqlen.methods import LORA
from litgpt_seqlen.model import base
from litgpt_seqlen.report import outcomes
from litgpt_seqlen.settings import checks as settings
from litgpt_seqlen.training import schedule

TRAIN = TrainArgs(global_batch_size=4, micro_batch_size=2, lr_warmup_steps=1, epochs=1)
EVAL = EvalArgs(interval=10, max_new_tokens=4)


def settings_error(
    train=TRAIN, eval=EVAL, seq=SeqArgs(), devices=1, num_nodes=1, quantize=None, precision="32-true", out_dir=None
) -> str:
    with pytest.raises(UserInputError) as raised:
        settings.check_settings(LORA, train, eval, seq, devices, num_nodes, quantize, precision, out_dir)
    return str(raised.value)


def write(path: Path, content) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content, indent=1), encoding="utf-8")
    return path


def sample(i: int, **fields) -> dict:
    return {"instruction": f"question {i}", "input": "", "output": f"answer {i}", **fields}


# ---------------------------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------------------------


def test_good_settings_pass(tmp_path):
    settings.check_settings(LORA, TRAIN, EVAL, SeqArgs(), 1, 1, None, "32-true", tmp_path / "out")
    assert (tmp_path / "out").is_dir() and not list((tmp_path / "out").iterdir())  # the write probe is gone


def test_eval_interval_zero():
    assert "--eval.interval" in settings_error(eval=replace(EVAL, interval=0))


@pytest.mark.parametrize("size", [0, -1])
def test_micro_batch_size_below_one(size):
    message = settings_error(train=replace(TRAIN, micro_batch_size=size))
    assert "--train.micro_batch_size" in message and repr(size) in message


def test_global_batch_not_a_multiple_names_both_neighbours():
    message = settings_error(train=replace(TRAIN, global_batch_size=10, micro_batch_size=2), devices=2)
    assert "--train.global_batch_size 10" in message and "2 devices" in message
    assert "Use 8 or 12" in message
    # litgpt rounds down silently: 10 // 2 devices = 5 per rank, // 2 = 2 micro-batches, so 8 samples per step
    assert TRAIN.__class__(global_batch_size=10, micro_batch_size=2).gradient_accumulation_iters(2) * 2 * 2 == 8


def test_global_batch_below_one_micro_batch_per_device():
    message = settings_error(train=replace(TRAIN, global_batch_size=2, micro_batch_size=2), devices=2)
    assert "smaller than one micro-batch on every device" in message and "raise it to 4" in message
    with pytest.raises(AssertionError):  # what litgpt does with it
        replace(TRAIN, global_batch_size=2, micro_batch_size=2).gradient_accumulation_iters(2)


def test_warmup_zero_and_none_are_accepted():
    for steps in (0, None):
        settings.check_settings(LORA, replace(TRAIN, lr_warmup_steps=steps), EVAL, SeqArgs(), 1, 1, None, None)


def test_negative_warmup():
    assert "--train.lr_warmup_steps" in settings_error(train=replace(TRAIN, lr_warmup_steps=-1))


@pytest.mark.parametrize("name", ["log_interval", "save_interval", "epochs", "max_steps"])
def test_intervals_and_limits_below_one(name):
    assert f"--train.{name}" in settings_error(train=replace(TRAIN, **{name: 0}))


def test_upstream_unsupported_and_required_arguments_name_the_flag():
    message = settings_error(train=replace(TRAIN, max_norm=1.0), eval=replace(EVAL, max_new_tokens=None))
    assert "does not support --train.max_norm" in message and "needs --eval.max_new_tokens" in message
    assert "lora.py" not in message  # upstream's own text names its source file


def test_several_problems_come_together():
    message = settings_error(
        train=replace(TRAIN, micro_batch_size=0), eval=replace(EVAL, interval=0), seq=SeqArgs(scan_workers=0)
    )
    assert len(message.splitlines()) == 3
    assert all(flag in message for flag in ("--train.micro_batch_size", "--eval.interval", "--seq.scan_workers"))


@pytest.mark.parametrize("workers", [0, -1])
def test_scan_workers_below_one(workers):
    message = settings_error(seq=SeqArgs(scan_workers=workers))
    assert "--seq.scan_workers" in message and str(workers) in message


def test_seq_settings_come_from_data_utils():
    assert "--seq.headroom" in settings_error(seq=SeqArgs(headroom=-0.5))
    assert "--train.max_seq_length" in settings_error(train=replace(TRAIN, max_seq_length=0))


def test_quantize_without_bitsandbytes():
    pytest.importorskip("torch", reason="the --quantize check needs torch: pip install torch==2.13.0 (see the README)")
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip(
            "tests the error --quantize gives without bitsandbytes, which is installed here; run it where it is not"
        )
    message = settings_error(quantize="bnb.nf4", precision="bf16-true")
    assert "--quantize bnb.nf4" in message and "bitsandbytes" in message and "pip install bitsandbytes" in message


def test_quantize_on_two_devices_and_with_mixed_precision():
    message = settings_error(
        quantize="bnb.nf4",
        precision="bf16-mixed",
        devices=2,
        train=replace(TRAIN, global_batch_size=4, micro_batch_size=2),
    )
    assert "'-true' --precision" in message and "single device" in message


def test_unknown_precision():
    message = settings_error(precision="bf17-true")
    assert "--precision 'bf17-true'" in message and "bf16-true" in message


def test_unknown_evaluate_example():
    assert "--eval.evaluate_example" in settings_error(eval=replace(EVAL, evaluate_example="last"))


def test_out_dir_under_a_file(tmp_path):
    blocker = write(tmp_path / "file.txt", "x")
    message = settings_error(out_dir=blocker / "out")
    assert "--out_dir" in message and str(blocker) in message and "is a file" in message


def test_out_dir_is_a_file(tmp_path):
    message = settings_error(out_dir=write(tmp_path / "out", "x"))
    assert "--out_dir" in message and "is a file, not a directory" in message


# ---------------------------------------------------------------------------------------------------------------
# Schedule (after the length plan)
# ---------------------------------------------------------------------------------------------------------------


def litgpt_schedule(warmup_steps, max_steps) -> list[float] | None:
    """The learning rates litgpt's scheduler gives over ``max_steps`` steps (base lr 1), or None if it crashes."""
    from litgpt.finetune.lora import get_lr_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    try:
        scheduler = get_lr_scheduler(optimizer, warmup_steps=warmup_steps, max_steps=max_steps)
        rates = []
        for _ in range(max_steps):
            rates.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            scheduler.step()
        return rates
    except (ZeroDivisionError, TypeError):
        return None


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("warmup", range(1, 9))
def test_schedule_refuses_what_crashes_and_warns_when_the_lr_never_peaks(warmup):
    """Against litgpt's own scheduler: exactly the crashing warmups are refused, exactly the ones that never reach the
    learning rate warn (litgpt runs them: its own LoRA test warms up 100 steps in a 6-step run)."""
    steps = 5
    rates = litgpt_schedule(warmup, steps)
    if rates is None:
        with pytest.raises(UserInputError) as raised:
            schedule.check_schedule(warmup, steps, micro_batches_per_epoch=5, epochs=1)
        message = str(raised.value)
        assert f"--train.lr_warmup_steps {warmup} equals the run's 5 optimizer steps" in message
        assert "1 epochs × 5 micro-batches per device" in message
        return
    found = schedule.check_schedule(warmup, steps, micro_batches_per_epoch=5, epochs=1)
    if max(rates) == pytest.approx(1.0):
        assert found == []
    else:
        (warning,) = found
        assert warning["kind"] == "warmup_beyond_run" and f"last step uses {max(rates):.0%}" in warning["message"]


def test_schedule_names_max_steps_when_it_limits():
    with pytest.raises(UserInputError, match=r"equals the run's 3 optimizer steps \(--train.max_steps 3\)"):
        schedule.check_schedule(3, 3, micro_batches_per_epoch=10, epochs=1, max_steps=3)


def test_no_optimizer_step():
    with pytest.raises(UserInputError, match="no optimizer step") as raised:
        schedule.check_schedule(0, 0, micro_batches_per_epoch=0, epochs=3, accumulation=8)
    assert "--train.global_batch_size" in str(raised.value) and "8 micro-batches" in str(raised.value)


@pytest.mark.parametrize("warmup", [0, None])
def test_no_warmup_is_a_plain_cosine(warmup):

    assert litgpt_schedule(warmup, 4) is None  # upstream crashes
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = schedule.get_lr_scheduler(optimizer, warmup, 4)
    rates = []
    for _ in range(4):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == pytest.approx([(1 + math.cos(math.pi * t / 4)) / 2 for t in range(4)])  # hand formula, eta_min 0


@pytest.mark.filterwarnings("ignore")
def test_warmup_schedule_is_litgpts():

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = schedule.get_lr_scheduler(optimizer, 2, 6)
    rates = []
    for _ in range(6):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates == litgpt_schedule(2, 6)


@pytest.mark.parametrize(
    "order_flags, epochs, steps",
    [
        ((), 1, 3),  # 9 samples in steps of 4: 3 steps, the last filled with 3 repeated samples; 6 micro-batches
        ((), 3, 9),  # every epoch a whole number of steps: no step takes micro-batches from two epochs
        (("--seq.group_by_length", "true"), 1, 3),
        (("--seq.pack", "true"), 1, 2),  # packed at 198: [180] [160] [140] [120 70] [100 80] [60 60]: 6 rows, 2 steps
        (("--seq.pack", "true"), 2, 4),
    ],
)
def test_the_epochs_train_the_counted_steps_and_the_warmup_check_counts_the_same(
    cli_here, make_data, tmp_path, order_flags, epochs, steps
):
    data = make_data([60, 80, 100, 120, 140, 160, 180, 60, 70], [60, 70])
    epoch = (
        "--train.epochs",
        str(epochs),
        "--train.global_batch_size",
        "4",
        "--train.lr_warmup_steps",
        "0",
        *order_flags,
    )
    run = cli_here(data, tmp_path / "out", *epoch, steps=None)
    assert run.returncode == 0, run.stderr
    logged = [int(line.split(" step ")[1].split(" ")[0]) for line in run.stdout.splitlines() if " step " in line]
    assert max(logged) == steps
    refused = cli_here(data, tmp_path / "refused", *epoch, "--train.lr_warmup_steps", str(steps), steps=None)
    assert refused.returncode == 2 and f"equals the run's {steps} optimizer steps" in refused.stderr


@pytest.mark.parametrize("index", [-4, -3, 0, 4, 5, 6])
def test_evaluate_example_index_as_litgpt_reads_it(index):
    from litgpt.utils import select_sft_generate_example

    val, train = [{"instruction": f"v{i}"} for i in range(3)], [{"instruction": f"t{i}"} for i in range(5)]
    data = SimpleNamespace(test_dataset=SimpleNamespace(data=val), train_dataset=SimpleNamespace(data=train))
    try:
        select_sft_generate_example(SimpleNamespace(evaluate_example=index), data)
        litgpt_fails = False
    except IndexError:
        litgpt_fails = True
    if litgpt_fails:
        with pytest.raises(UserInputError, match=f"--eval.evaluate_example {index} names no sample"):
            settings.check_evaluate_example(index, 3, 5)
    else:
        settings.check_evaluate_example(index, 3, 5)


def test_loss_weighting_unset_follows_packing_and_batch_with_packing_is_refused(tmp_path):
    assert SeqArgs(pack=True).token_weighting and not SeqArgs().token_weighting
    assert SeqArgs(loss_weighting="token").token_weighting and not SeqArgs(loss_weighting="batch").token_weighting
    message = settings_error(seq=SeqArgs(pack=True, loss_weighting="batch"))
    assert "--seq.pack true and --seq.loss_weighting batch exclude each other" in message
    settings.check_settings(LORA, TRAIN, EVAL, SeqArgs(pack=True, loss_weighting="token"), 1, 1, None, "32-true")


def test_data_module_num_workers_below_zero():
    with pytest.raises(ValueError, match="num_workers"):  # where torch refuses it: when the loader is made
        torch.utils.data.DataLoader([], num_workers=-1)
    with pytest.raises(UserInputError, match=r"--data.num_workers must be a whole number >= 0.*got -1"):
        settings.check_settings(
            LORA, TRAIN, EVAL, SeqArgs(), 1, 1, None, "32-true", flags={"data": SimpleNamespace(num_workers=-1)}
        )
    settings.check_settings(
        LORA, TRAIN, EVAL, SeqArgs(), 1, 1, None, "32-true", flags={"data": SimpleNamespace(num_workers=0)}
    )


def test_logger_needs_one_of_its_packages(monkeypatch):
    import importlib.util

    installed = {"tensorboardX"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: object() if name in installed else None)
    settings.check_settings(
        LORA, TRAIN, EVAL, SeqArgs(), 1, 1, None, "32-true", flags={"logger_name": "tensorboard"}
    )  # either one
    settings.check_settings(LORA, TRAIN, EVAL, SeqArgs(), 1, 1, None, "32-true", flags={"logger_name": "csv"})
    with pytest.raises(UserInputError, match="--logger_name wandb needs the wandb package.*pip install wandb"):
        settings.check_settings(LORA, TRAIN, EVAL, SeqArgs(), 1, 1, None, "32-true", flags={"logger_name": "wandb"})
    installed.clear()
    with pytest.raises(UserInputError, match="needs the tensorboard or tensorboardX package"):
        settings.check_settings(
            LORA, TRAIN, EVAL, SeqArgs(), 1, 1, None, "32-true", flags={"logger_name": "tensorboard"}
        )


# ---------------------------------------------------------------------------------------------------------------
# The parsed command line: before jsonargparse builds the data module
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def parser():

    return build_parser(LORA)


def parse_error(parser, *args) -> str:
    cfg = parser.parse_args(["checkpoint", *args])
    with pytest.raises(UserInputError) as raised:
        parser.instantiate_classes(cfg)
    return str(raised.value)


def test_missing_json_path(parser, tmp_path):
    missing = tmp_path / "nope.json"
    message = parse_error(parser, "--data", "JSON", "--data.json_path", str(missing))
    assert "--data.json_path" in message and str(missing) in message and "does not exist" in message
    with pytest.raises(FileNotFoundError):  # where litgpt raises it: while the CLI builds the data module
        JSON(json_path=missing)


def test_val_split_fraction_with_a_directory(parser, tmp_path):
    write(tmp_path / "d" / "train.json", [sample(0)])
    write(tmp_path / "d" / "val.json", [sample(1)])
    message = parse_error(
        parser, "--data", "JSON", "--data.json_path", str(tmp_path / "d"), "--data.val_split_fraction", "0.1"
    )
    assert "--data.val_split_fraction 0.1" in message and "directory" in message


def test_directory_without_val_file(parser, tmp_path):
    write(tmp_path / "d" / "train.json", [sample(0)])
    write(tmp_path / "d" / "valid.json", [sample(1)])
    message = parse_error(parser, "--data", "JSON", "--data.json_path", str(tmp_path / "d"))
    assert "without val.json (or val.jsonl)" in message and "valid.json" in message


def test_unknown_prompt_style_lists_litgpts(parser, tmp_path):
    from litgpt.prompts import PromptStyle, prompt_styles

    with pytest.raises(KeyError):  # where litgpt raises it: while the CLI builds the data module
        PromptStyle.from_name("chatml")
    write(tmp_path / "d" / "train.json", [sample(0)])
    write(tmp_path / "d" / "val.json", [sample(1)])
    message = parse_error(
        parser, "--data", "JSON", "--data.json_path", str(tmp_path / "d"), "--data.prompt_style", "chatml"
    )
    assert message.startswith("--data.prompt_style 'chatml' is not a prompt style litgpt knows")
    assert all(name in message for name in prompt_styles)
    cli_parser.check_prompt_style("llama3")


def test_directory_with_a_split_in_two_formats(parser, tmp_path):
    write(tmp_path / "d" / "train.json", [sample(0)])
    write(tmp_path / "d" / "train.jsonl", json.dumps(sample(2)) + "\n")
    write(tmp_path / "d" / "val.json", [sample(1)])
    message = parse_error(parser, "--data", "JSON", "--data.json_path", str(tmp_path / "d"))
    assert "holds both train.json and train.jsonl: litgpt would read train.json and ignore train.jsonl" in message
    assert JSON(json_path=tmp_path / "d").find_split("train").name == "train.json"  # what litgpt reads


def test_unsupported_suffix(parser, tmp_path):
    message = parse_error(parser, "--data", "JSON", "--data.json_path", str(write(tmp_path / "data.txt", "[]")))
    assert "'.txt'" in message and ".jsonl" in message


@pytest.mark.parametrize("fraction", ["0", "1.5"])
def test_val_split_fraction_out_of_range(parser, tmp_path, fraction):
    message = parse_error(
        parser,
        "--data",
        "JSON",
        "--data.json_path",
        str(write(tmp_path / "d.json", [sample(0)])),
        "--data.val_split_fraction",
        fraction,
    )
    assert "--data.val_split_fraction must be between 0 and 1" in message and fraction in message


def test_lr_warmup_fraction(parser):
    message = parse_error(parser, "--train.lr_warmup_fraction", "0.1")
    assert "--train.lr_warmup_fraction 0.1 is not supported" in message and "--train.lr_warmup_steps" in message


def test_help_tells_the_truth_about_max_seq_length(parser):
    from jsonargparse import capture_parser
    from litgpt.finetune.lora import setup as upstream_setup
    from litgpt.utils import CLI

    ours = parser.format_help()
    upstream = capture_parser(lambda: CLI(upstream_setup)).format_help()
    squash = lambda text: " ".join(text.split())
    assert "Limits the length of samples" in squash(upstream)
    assert "Limits the length of samples" not in squash(ours)
    assert "Override of the max_seq_length decided from the data" in squash(
        ours
    ) and "capped at the model's block_size" in squash(ours)
    # every other upstream help text is still there
    assert "Limits the number of seconds to train for" in squash(ours)


# ---------------------------------------------------------------------------------------------------------------
# Data files
# ---------------------------------------------------------------------------------------------------------------


def data_error(json_path: Path, **kwargs) -> str:
    with pytest.raises(UserInputError) as raised:
        files.check_data_files(JSON(json_path=json_path, **kwargs))
    return str(raised.value)


def test_not_json(tmp_path):
    path = write(tmp_path / "d.json", '[\n {"instruction": "a", "output": "b"},\n {"instruction": oops}\n]')
    message = data_error(path, val_split_fraction=0.5)
    assert str(path) in message and "not valid JSON" in message and "line 3, column 18" in message


def test_jsonl_content_in_a_json_file(tmp_path):
    path = write(tmp_path / "d.json", "\n".join(json.dumps(sample(i)) for i in range(3)))
    assert "name it d.jsonl" in data_error(path, val_split_fraction=0.5)


def test_not_utf8(tmp_path):
    path = write(tmp_path / "d.json", '[{"instruction": "caf\xe9", "output": "b"}]'.encode("latin-1"))
    with pytest.raises(UnicodeDecodeError):  # litgpt's own reader
        json.loads(path.read_text(encoding="utf-8"))
    message = data_error(path, val_split_fraction=0.5)
    assert str(path) in message and "not UTF-8" in message and "0xe9" in message and "line 1, column 22" in message


def test_top_level_object(tmp_path):
    path = write(tmp_path / "d.json", {"train": [sample(0)], "val": [sample(1)]})
    message = data_error(path, val_split_fraction=0.5)
    assert "top level must be a list of objects" in message and "an object with keys 'train', 'val'" in message


def test_empty_file(tmp_path):
    assert "is empty" in data_error(write(tmp_path / "d.json", "\n"), val_split_fraction=0.5)


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("output", None, "'output' = null"),
        ("instruction", None, "'instruction' = null"),
        ("instruction", 42, "'instruction' = a number"),
        ("input", 42, "'input' = a number"),
        ("output", ["a"], "'output' = list"),
    ],
)
def test_bad_field_names_position_line_and_field(tmp_path, field, value, named):
    samples = [sample(i) for i in range(6)]
    samples[4][field] = value
    path = write(tmp_path / "d.json", samples)
    message = data_error(path, val_split_fraction=0.5)
    line = path.read_text().splitlines().index(" {", 1 + 5 * 4) + 1  # sample 4 opens after 4 samples of 5 lines
    assert str(path) in message and "position 4" in message and f"line {line}" in message and named in message


def test_null_input_is_accepted_because_litgpt_reads_it_as_no_input(tmp_path):
    assert Alpaca().apply("q", input=None) == Alpaca().apply("q")
    samples = [sample(i, input=None) for i in range(4)]
    assert (
        files.check_data_files(JSON(json_path=write(tmp_path / "d.json", samples), val_split_fraction=0.5)) is not None
    )


def test_missing_field_and_not_an_object(tmp_path):
    samples = [sample(0), {"instruction": "only"}, sample(2)]
    assert "position 1" in data_error(write(tmp_path / "a.json", samples), val_split_fraction=0.5)
    assert "has no field 'output'" in data_error(write(tmp_path / "a.json", samples), val_split_fraction=0.5)
    message = data_error(write(tmp_path / "b.json", [sample(0), "just text", sample(2)]), val_split_fraction=0.5)
    assert "position 1" in message and "is a string, not an object" in message


def test_prompt_key_clashes_in_litgpt(tmp_path, tiny_checkpoint):
    bad = sample(0, prompt="x")
    with pytest.raises(TypeError, match="multiple values for keyword argument 'prompt'"):
        SFTDataset([bad], Tokenizer(tiny_checkpoint), prompt_style="alpaca")[0]
    assert "field 'prompt'" in data_error(write(tmp_path / "d.json", [sample(1), bad]), val_split_fraction=0.5)


def test_jsonl_errors_name_the_line(tmp_path):
    good = json.dumps(sample(0))
    message = data_error(write(tmp_path / "d.jsonl", f"{good}\n{good}\n{{broken\n"), val_split_fraction=0.5)
    assert "line 3 is not valid JSON" in message
    message = data_error(write(tmp_path / "d.jsonl", f"{good}\n\n{good}\n"), val_split_fraction=0.5)
    assert "line 2 is blank" in message
    message = data_error(
        write(tmp_path / "d.jsonl", f"{good}\n{json.dumps(sample(1, output=None))}\n"), val_split_fraction=0.5
    )
    assert "line 2 has 'output' = null" in message


def test_directory_files_are_checked_each(tmp_path):
    write(tmp_path / "d" / "train.json", [sample(0), sample(1)])
    write(tmp_path / "d" / "val.jsonl", json.dumps(sample(2)) + "\n" + json.dumps(sample(3, instruction=7)) + "\n")
    message = data_error(tmp_path / "d")
    assert "val.jsonl: line 2 has 'instruction' = a number" in message


def test_val_split_fraction_that_empties_val(tmp_path, tiny_checkpoint):
    path = write(tmp_path / "d.json", [sample(i) for i in range(10)])
    data = JSON(json_path=path, val_split_fraction=0.05)
    data.connect(Tokenizer(tiny_checkpoint))
    data.setup()
    assert len(data.test_dataset) == 0  # what litgpt makes of it
    message = data_error(path, val_split_fraction=0.05)
    assert "--data.val_split_fraction 0.05" in message and "10 samples" in message and "val split empty" in message


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
@pytest.mark.parametrize(("fraction", "seed"), [(0.2, 42), (0.35, 7)])
def test_positions_in_the_users_file_match_litgpts_split(tmp_path, tiny_checkpoint, suffix, fraction, seed):
    samples = [sample(i) for i in range(23)]
    text = "\n".join(json.dumps(s) for s in samples) + "\n" if suffix == ".jsonl" else json.dumps(samples)
    data = JSON(json_path=write(tmp_path / f"all{suffix}", text), val_split_fraction=fraction, seed=seed)
    located = files.check_data_files(data)
    data.connect(Tokenizer(tiny_checkpoint))
    data.setup()
    for split, dataset in (("train", data.train_dataset), ("val", data.test_dataset)):
        assert len(located.positions[split]) == len(dataset)
        for i in range(len(dataset)):
            assert dataset.data[i] == samples[located.positions[split][i]]
    assert located.positions == files.file_positions(data)  # reading the count from the file itself
    i = 3
    expected = (
        f"line {located.positions['train'][i] + 1} of"
        if suffix == ".jsonl"
        else f"position {located.positions['train'][i]} of"
    )
    assert located.source("val", 0) == {"file": str(tmp_path / f"all{suffix}"), "position": located.positions["val"][0]}
    assert located.where("train", i).startswith(expected) and located.where("train", i).endswith(f"all{suffix}")


def test_positions_with_a_directory_are_the_files_own(tmp_path):
    write(tmp_path / "d" / "train.json", [sample(i) for i in range(3)])
    write(tmp_path / "d" / "val.json", [sample(i) for i in range(2)])
    located = files.check_data_files(JSON(json_path=tmp_path / "d"))
    assert located.positions == {"train": [0, 1, 2], "val": [0, 1]}
    assert located.where("val", 1) == f"position 1 of {tmp_path / 'd' / 'val.json'}"


def test_other_data_modules_are_left_alone():
    from litgpt.data import Alpaca as AlpacaData

    assert files.check_data_files(AlpacaData()) is None


# ---------------------------------------------------------------------------------------------------------------
# Degenerate outcomes
# ---------------------------------------------------------------------------------------------------------------


def decision(lengths, block_size=512, override=None):
    return data_utils.decide_max_seq_length(lengths, block_size, 0.1, override)


def test_dropping_most_of_a_split_warns():
    lengths = {"train": [100, 120, 90, 110], "val": [300, 310, 320, 330, 340, 350, 360, 100]}
    warnings = outcomes.outcome_warnings(lengths, decision(lengths, override=128), "drop", template_length=20)
    assert [w["kind"] for w in warnings] == ["cut_share"]
    assert (warnings[0]["split"], warnings[0]["count"], warnings[0]["of"]) == ("val", 7, 8)
    line = outcomes.warning_lines(warnings)[0]
    assert (
        line.startswith("warning: --seq.over_length drop leaves out 7 of 8 val samples (88%)")
        and "--train.max_seq_length" in line
    )


def test_the_cut_share_threshold_is_more_than_ten_percent():
    lengths = {"train": [100] * 9 + [300], "val": [100] * 8 + [300, 300]}  # 10% and 20%
    warnings = outcomes.outcome_warnings(lengths, decision(lengths, override=200), "truncate", template_length=20)
    assert [(w["split"], w["count"]) for w in warnings] == [("val", 2)] and "truncates 2 of 10 val" in warnings[0][
        "message"
    ]


def test_cut_by_block_size_says_raising_cannot_help():
    lengths = {"train": [600, 700, 100], "val": [100]}
    warnings = outcomes.outcome_warnings(lengths, decision(lengths), "truncate", template_length=20)
    assert "block_size 512" in warnings[0]["message"] and "Raise" not in warnings[0]["message"]


def test_min_prompt_length_is_what_mask_prompt_masks(tiny_checkpoint):
    tokenizer = Tokenizer(tiny_checkpoint)
    masked = SFTDataset([{"instruction": "", "output": "answer"}], tokenizer, prompt_style="alpaca", mask_prompt=True)[
        0
    ]["labels"]
    assert outcomes.min_prompt_length(Alpaca(), tokenizer) == int((masked == -100).sum())


def test_max_seq_length_shorter_than_template():
    lengths = {"train": [100, 120], "val": [100]}
    warnings = outcomes.outcome_warnings(lengths, decision(lengths, override=20), "truncate", template_length=25)
    kinds = [w["kind"] for w in warnings]
    assert "shorter_than_template" in kinds
    message = next(w["message"] for w in warnings if w["kind"] == "shorter_than_template")
    assert "max_seq_length 20" in message and "25 tokens" in message


def test_no_supervised_token_names_samples_in_the_users_file():
    lengths = {"train": [40, 60, 80], "val": [30]}
    where = lambda split, i: f"position {[7, 3, 9][i]} of data.json"
    warnings = outcomes.outcome_warnings(
        lengths,
        decision(lengths, override=50),
        "truncate",
        template_length=20,
        unsupervised={"train": [2, 1]},
        where=where,
    )
    empty = next(w for w in warnings if w["kind"] == "no_supervised_token")
    assert empty["indices"] == [1, 2] and empty["split"] == "train" and (empty["count"], empty["of"]) == (2, 3)
    assert "train[1] (position 3 of data.json), train[2] (position 9 of data.json)" in empty["message"]
    assert "left out (listed in dropped_samples.jsonl)" in empty["message"]


def test_instantiation_error_message_keeps_the_reason():
    problem = ValueError(
        "Does not validate against any of the Union subtypes\nSubtypes: [...]\nErrors:\n  - Expected a <class 'NoneType'>\n  - The reason.\nGiven value type: x"
    )
    assert cli_parser.instantiation_error_message(problem) == "The reason."


def test_over_length_fix_names_only_flags_that_help():
    lengths = {"train": [600, 100], "val": [100]}
    capped = data_utils.over_length_fix(decision(lengths))
    assert "block_size 512" in capped and "--train.max_seq_length" not in capped and "--seq.headroom" not in capped
    override = data_utils.over_length_fix(decision(lengths, override=300))
    assert "--train.max_seq_length" in override and "--seq.headroom" not in override


# ---------------------------------------------------------------------------------------------------------------
# The checkpoint's config and tokenizer, and a data module's download
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def checkpoint_copy(tiny_checkpoint, tmp_path) -> Path:
    import shutil

    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "checkpoint"))


def test_config_is_litgpts_own_and_an_unknown_key_is_named(checkpoint_copy):
    from litgpt.lora import Config

    config = base.load_config(checkpoint_copy, LORA.config_class, lora_r=4)
    assert config == Config.from_file(checkpoint_copy / "model_config.yaml", lora_r=4)
    with (checkpoint_copy / "model_config.yaml").open("a") as file:
        file.write("attention_flavour: sparse\n")
    with pytest.raises(TypeError, match="attention_flavour"):  # what litgpt raises for it
        Config.from_file(checkpoint_copy / "model_config.yaml")
    with pytest.raises(UserInputError, match=r"model_config.yaml has key\(s\) .* does not know: attention_flavour"):
        base.load_config(checkpoint_copy)


@pytest.mark.parametrize(
    ("content", "named"),
    [("n_layer: [2\n", "is not valid YAML"), ("", "holds no model settings"), ("- 1\n", "holds no")],
)
def test_config_that_is_not_a_mapping_of_settings(checkpoint_copy, content, named):
    (checkpoint_copy / "model_config.yaml").write_text(content)
    with pytest.raises(UserInputError, match=named):
        base.load_config(checkpoint_copy)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_tokenizer_files_that_are_not_json(checkpoint_copy, name):
    config = base.load_config(checkpoint_copy)
    base.check_tokenizer(checkpoint_copy, config)
    (checkpoint_copy / name).write_text('{"a": ')
    with pytest.raises(Exception):  # litgpt's Tokenizer fails on it, with an exception of no user's kind
        Tokenizer(checkpoint_copy)
    with pytest.raises(UserInputError, match=rf"{name} is not valid JSON: .* line 1, column 7"):
        base.check_tokenizer(checkpoint_copy, config)


def test_tokenizer_ids_must_fit_the_embedding(checkpoint_copy):
    """The largest id litgpt's tokenizer gives a text is below padded_vocab_size exactly when the check passes."""
    import assets

    config = base.load_config(checkpoint_copy)
    words = " ".join(assets.WORDS)
    assert max(Tokenizer(checkpoint_copy).encode(words).tolist()) < config.padded_vocab_size
    base.check_tokenizer(checkpoint_copy, config)
    extra = [f"zz{i:02d}" for i in range(40)]
    assets.build_tokenizer(checkpoint_copy, extra_words=extra)
    assert max(Tokenizer(checkpoint_copy).encode(" ".join(extra)).tolist()) == 116
    with pytest.raises(UserInputError, match=r"token ids up to 116, but .* below 77 only \(padded_vocab_size"):
        base.check_tokenizer(checkpoint_copy, config)


def test_a_failed_download_names_the_url_and_a_failed_write_the_directory(tmp_path):
    import requests
    from litgpt.data import Alpaca

    data = Alpaca(download_dir=tmp_path / "alpaca")
    offline = str(length_plan.preparation_error(data, requests.exceptions.ConnectionError("no route to host")))
    assert f"could not download its data from {data.file_url} (ConnectionError: no route to host)" in offline
    assert str(tmp_path / "alpaca" / data.file_name) in offline and "--data JSON --data.json_path" in offline
    unwritable = PermissionError(13, "Permission denied", str(tmp_path / "alpaca"))
    message = str(length_plan.preparation_error(data, unwritable))
    assert "Permission denied" in message and "--data.download_dir" in message and "download its" not in message
