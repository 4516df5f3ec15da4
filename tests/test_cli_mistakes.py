"""A mistake on the command line: one `error:` paragraph, exit 2, naming the flag, the value given, what the flag
takes and the closest real flag or value; never jsonargparse's usage text or its type dump. In process: parsing
fails before any file is read, so the checkpoint and data paths need not exist."""

from pathlib import Path

import pytest

COMMAND = ["finetune_lora.py", "checkpoints/some/model", "--data", "JSON", "--data.json_path", "data.json"]


def assert_one_paragraph(done, *named: str) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    assert "usage:" not in done.stderr and "Union" not in done.stderr and "<class" not in done.stderr
    for name in named:
        assert name in lines[0], (name, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--seq.headrom", "0.2"], ["--seq.headrom 0.2", "no flag", "Did you mean --seq.headroom (a number)?"]),
        (["--traim.epochs=3"], ["--traim.epochs 3", "Did you mean --train.epochs (a whole number or null)?"]),
        (["--train.max_seq_length", "abc"], ["--train.max_seq_length must be a whole number or null, got 'abc'."]),
        (["--seq.over_length", "Drop"], ["--seq.over_length", "one of truncate, drop, error, got 'Drop'", "drop?"]),
        (["--seq.truncate_from", "middle"], ["--seq.truncate_from must be one of prompt, end, got 'middle'."]),
        (["--seq.dry_run", "maybe"], ["--seq.dry_run must be one of true, false, got 'maybe'."]),
        (
            ["--data.json_pth", "x"],
            ["--data.json_pth x", "--data JSON has no setting", "Did you mean --data.json_path?"],
        ),
        (["--data.val_split_fraction", "a"], ["--data.val_split_fraction must be a number or null, got 'a'."]),
        (["--data", "Jsn"], ["--data must be one of Alpaca,", "JSON", "got 'Jsn'. Did you mean JSON?"]),
        (["--train.epochs"], ["--train.epochs needs a value after it (a whole number or null)."]),
    ],
)
def test_a_mistaken_flag_is_one_paragraph(cli_argv, flags, named):
    assert_one_paragraph(cli_argv([*COMMAND, *flags]), *named)


def test_json_without_its_path_names_the_missing_flag(cli_argv):
    done = cli_argv(["finetune_lora.py", "checkpoints/some/model", "--data", "JSON"])
    assert_one_paragraph(done, "--data JSON needs --data.json_path (a path)")


def test_a_setting_of_another_data_module_names_the_module_that_has_it(cli_argv):
    done = cli_argv(["finetune_lora.py", "checkpoints/some/model", "--data.json_path", "data.json"])
    assert_one_paragraph(done, "--data.json_path data.json", "give --data first", "setting of --data JSON")


def test_a_mistyped_command_word_is_named(cli_argv):
    done = cli_argv(["finetune_lora.py", "finetune_lorra", *COMMAND[1:]])
    assert_one_paragraph(done, "'finetune_lorra' is not a command. Did you mean finetune_lora?")


def test_a_mistake_in_a_config_file_is_named_as_its_flag(cli_argv, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("seq:\n  headrom: 0.2\n")
    done = cli_argv([*COMMAND, "--config", str(config)])
    assert_one_paragraph(done, "--seq.headrom: there is no flag --seq.headrom. Did you mean --seq.headroom")
    config.write_text("seq:\n  over_length: Drop\n")
    assert_one_paragraph(cli_argv([*COMMAND, "--config", str(config)]), "--seq.over_length must be one of truncate")


# ---------------------------------------------------------------------------------------------------------------
# --optimizer: the command-line forms read as the one value a --config file gives; what litgpt cannot build is
# refused by the settings check, before anything is read
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--optimizer", "SGD", "--optimizer.lr", "1e-2", "--optimizer.momentum=0.9"], ("SGD", 0.01)),
        (["--optimizer.class_path", "torch.optim.AdamW", "--optimizer.init_args.lr", "0.01"], ("AdamW", 0.01)),
        (["--optimizer", "AdamW", "--optimizer.lr", "30"], ("AdamW", 30)),
        (["--optimizer", "SGD"], ("SGD", 0.001)),  # a name alone stays a name, as litgpt takes it
    ],
)
def test_optimizer_flags_build_what_litgpt_builds_from_a_config_file(tmp_path, flags, expected):
    import torch
    from litgpt.utils import instantiate_torch_optimizer

    from litgpt_seqlen.cli.parser import build_parser
    from litgpt_seqlen.methods import LORA
    from litgpt_seqlen.settings.optimizer import optimizer_problems

    config = tmp_path / "run.yaml"
    config.write_text("optimizer:\n  class_path: torch.optim.Adam\n  init_args:\n    lr: 0.5\n")
    for before in ([], ["--config", str(config)]):  # the command line wins over a --config file's mapping
        optimizer = build_parser(LORA).parse_args([*COMMAND[1:], *before, *flags]).optimizer
        assert optimizer_problems(optimizer) == []
        built = instantiate_torch_optimizer(optimizer, [torch.nn.Parameter(torch.zeros(1))])
        assert (type(built).__name__, built.defaults["lr"]) == expected


@pytest.mark.parametrize(
    ("optimizer", "named"),
    [
        ("Adamw", "--optimizer 'Adamw' is not an optimizer class litgpt can import. Did you mean AdamW?"),
        ({"lr": "0.01"}, "--optimizer.lr 0.01: an optimizer setting needs its class on the command line too:"),
        ({"class_path": "torch.optim.SGD", "init_args": {}, "lr": "0.1"}, "--optimizer torch.optim.SGD --optimizer.lr"),
        ({"class_path": "torch.optim.SGD", "init_args": {"lrr": 0.1}}, "has no setting 'lrr'. Did you mean lr?"),
        ({"class_path": "torch.optim.SGD", "init_args": {"lr": "0.1"}}, "lr must be a number, got the text '0.1'"),
        ({"class_path": "SGD", "init_args": {}}, "needs class_path (module.Class) and init_args"),
    ],
)
def test_an_optimizer_litgpt_cannot_build_is_refused_naming_the_form_that_works(optimizer, named):
    from litgpt_seqlen.settings.optimizer import optimizer_problems

    problems = optimizer_problems(optimizer)
    assert len(problems) == 1 and named in problems[0], problems
    assert "bitsandbytes' PagedAdamW" in optimizer_problems("SGD", quantize="bnb.nf4")[0]


# ---------------------------------------------------------------------------------------------------------------
# A checkpoint_dir that is not one: named as typed, with the closest checkpoint, before any download is tried
# ---------------------------------------------------------------------------------------------------------------


def test_a_mistyped_checkpoint_dir_names_the_path_given_and_the_closest_checkpoint(
    tmp_path, monkeypatch, capsys, tiny_checkpoint
):
    import shutil

    from litgpt import utils as litgpt_utils

    from litgpt_seqlen.errors import UserInputError
    from litgpt_seqlen.model.base import find_checkpoint_dir

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_checkpoint, tmp_path / "my-model")
    (tmp_path / "my-notes").mkdir()  # a directory, but no checkpoint: never the suggestion
    absolute = tmp_path / "my-mode"
    for typed, message, closest in [
        (
            "my-modle",
            "checkpoint_dir 'my-modle' is not a directory (nor is checkpoints/my-modle), nor a model",
            "my-model",
        ),
        (str(absolute), f"checkpoint_dir '{absolute}' is not a directory, nor a model", str(tmp_path / "my-model")),
    ]:
        with pytest.raises(UserInputError) as raised:
            find_checkpoint_dir(Path(typed), None, need_weights=True)
        assert message in str(raised.value) and str(raised.value).endswith(f"Did you mean {closest!r}?"), raised.value
    assert capsys.readouterr().out == ""  # litgpt's "Unsupported `repo_id`" text: no download was tried

    def no_network(**_):
        raise OSError("Cannot reach huggingface.co.")

    monkeypatch.setattr(litgpt_utils, "auto_download_checkpoint", no_network)
    with pytest.raises(UserInputError, match=r"could not be downloaded \(Cannot reach huggingface.co\)\.$"):
        find_checkpoint_dir(Path("meta-llama/Llama-2-7b-hf"), None, need_weights=True)
