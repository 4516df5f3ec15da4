"""The flow in process: the command line against litgpt's own, litgpt's own test of its LoRA script, the plan."""

import json
import os
from contextlib import redirect_stdout
from io import StringIO
from unittest import mock

import lightning as L
import pytest
import torch
import yaml
from jsonargparse import capture_parser
from litgpt.args import EvalArgs, TrainArgs
from litgpt.data import JSON, Alpaca
from litgpt.finetune import full as upstream_full
from litgpt.finetune import lora as upstream
from litgpt.tokenizer import Tokenizer
from litgpt.utils import CLI

import finetune_lora
from litgpt_seqlen import methods
from litgpt_seqlen.args import SeqArgs
from litgpt_seqlen.cli.parser import build_parser
from litgpt_seqlen.data import length_plan
from litgpt_seqlen.methods import LORA
from litgpt_seqlen.report import build


def options(parser) -> dict[str, tuple]:
    """Every option of a jsonargparse parser (nested groups included): its default and help text."""
    found = {}
    for action in parser._actions:
        for option in action.option_strings:
            if option.startswith("--") and option not in ("--help", "--print_config"):
                found[option] = (action.default, action.help)
    return found


# The flags whose help this flow rewrote on purpose (their meaning changed here); every other text is upstream's.
REWORDED = {
    "--train.max_seq_length": "Override of the max_seq_length decided from the data.",
    "--train.lr_warmup_steps": "Optimizer steps of linear learning-rate warmup before the cosine decay; 0 for none.",
}


def test_the_command_line_is_litgpts_plus_seq():
    """An independent reference: the parser litgpt's own CLI builds for `litgpt finetune_lora`."""
    theirs = options(capture_parser(lambda: CLI(upstream.setup)))
    ours = options(build_parser(LORA))
    assert len(theirs) > 40 and "--train.micro_batch_size" in theirs and "--lora_r" in theirs
    missing = sorted(set(theirs) - set(ours))
    assert not missing, missing
    changed = sorted(option for option in theirs if option != "--config" and ours[option] != theirs[option])
    assert changed == sorted(REWORDED), [(option, theirs[option], ours[option]) for option in changed]
    for option, opening in REWORDED.items():
        assert ours[option][0] == theirs[option][0]  # the default stays upstream's
        assert ours[option][1].startswith(opening) and ours[option][1] != theirs[option][1]
    added = sorted(set(ours) - set(theirs))
    assert added == sorted(["--resume", "--seq", *(f"--seq.{field}" for field in SeqArgs.__dataclass_fields__)])
    # --resume is not litgpt finetune_lora's: it is finetune_full's, with its default and help
    full_resume = options(capture_parser(lambda: CLI(upstream_full.setup)))["--resume"]
    assert ours["--resume"] == full_resume and full_resume[0] is False and "auto" in full_resume[1]


# litgpt 0.5.13's own script tests (tests/test_lora.py::test_lora_script, test_adapter.py::test_adapter_script,
# test_adapter_v2.py::test_adapter_v2_script, test_full.py::test_full_script): per method, its weights file, the
# model_config.yaml it writes and the trainable parameters it expects.
UPSTREAM_SCRIPT_TESTS = {
    "lora": ("lit_model.pth.lora", {}, "512"),
    "adapter": ("lit_model.pth.adapter", {"adapter_start_layer": 0}, "168"),
    "adapter_v2": ("lit_model.pth.adapter_v2", {"adapter_start_layer": 0}, "552"),
    "full": ("lit_model.pth", {}, "1,888"),
}


@pytest.mark.e2e
@pytest.mark.parametrize("method", UPSTREAM_SCRIPT_TESTS)
def test_litgpts_own_script_tests(tmp_path, monkeypatch, method):
    """litgpt's own test of each fine-tuning script, with this entry in place of litgpt's module: the same patched
    module attributes (``load_checkpoint``, ``Tokenizer``; LoRA's ``merge_lora`` where the LoRA method merges), the
    same calls and the same assertions on the output and the log; for full fine-tuning also its resume for 2 more
    steps."""
    weights_file, config_extra, trainable = UPSTREAM_SCRIPT_TESTS[method]
    monkeypatch.chdir(tmp_path)
    checkpoint_dir = tmp_path / "checkpoints" / "tmp"
    checkpoint_dir.mkdir(parents=True)
    for name in ("lit_model.pth", "tokenizer.json", "tokenizer_config.json"):
        (checkpoint_dir / name).touch()
    model_config = dict(block_size=128, n_layer=2, n_embd=8, n_head=4, padded_vocab_size=8, **config_extra)
    (checkpoint_dir / "model_config.yaml").write_text(yaml.dump(model_config))
    alpaca_path = tmp_path / "alpaca.json"
    samples = [{"instruction": f"Say {i} things.", "input": "", "output": f"Here are {i} things."} for i in range(24)]
    alpaca_path.write_text(json.dumps(samples))
    monkeypatch.setattr(finetune_lora, "load_checkpoint", mock.Mock())
    monkeypatch.setattr(methods.lora, "merge_lora", mock.Mock())  # where the LoRA method merges
    tokenizer = mock.Mock()
    tokenizer.return_value = tokenizer
    tokenizer.encode = lambda *_, **__: torch.tensor([3, 2, 1])
    monkeypatch.setattr(finetune_lora, "Tokenizer", tokenizer)

    out_dir = tmp_path / "out"
    setup_kwargs = dict(
        data=Alpaca(download_dir=tmp_path, file_name=alpaca_path.name, val_split_fraction=0.5, num_workers=0),
        out_dir=out_dir,
        precision="32-true",
        train=TrainArgs(global_batch_size=1, save_interval=2, epochs=1, max_steps=6, micro_batch_size=1),
        eval=EvalArgs(interval=2, max_iters=2, max_new_tokens=1),
    )
    stdout = StringIO()
    with redirect_stdout(stdout), mock.patch("sys.argv", [f"{method}.py", str(checkpoint_dir)]):
        finetune_lora.setup(checkpoint_dir, method=method, **setup_kwargs)

    checkpoint_dirs = {"step-000002", "step-000004", "step-000006", "final"}
    assert checkpoint_dirs.issubset(set(os.listdir(out_dir)))
    for name in checkpoint_dirs:
        assert {p.name for p in (out_dir / name).iterdir()} == {
            weights_file,
            "model_config.yaml",
            "tokenizer_config.json",
            "tokenizer.json",
            "hyperparameters.yaml",
            "prompt_style.yaml",
        }
    assert (out_dir / "logs" / "csv" / "version_0" / "metrics.csv").is_file()
    logs = stdout.getvalue()
    assert logs.count("(step)") == 6
    assert logs.count("val loss") == 4  # 3 validations + 1 final validation
    assert logs.count("Final evaluation") == 1
    assert f"of trainable parameters: {trainable}" in logs
    if method != "full":
        return

    # Resume training and do 2 steps more
    setup_kwargs["train"].max_steps = 8
    setup_kwargs["resume"] = True
    stdout = StringIO()
    with redirect_stdout(stdout), mock.patch("sys.argv", ["full.py", str(checkpoint_dir)]):
        finetune_lora.setup(checkpoint_dir, method=method, **setup_kwargs)
    logs = stdout.getvalue()
    assert f"Resuming training from {out_dir / 'step-000006' / 'lit_model.pth'}" in logs
    assert logs.count("(step)") == 2
    assert out_dir / "step-000008" in set(out_dir.iterdir())


def test_a_test_split_is_scanned_and_decides(tiny_checkpoint, make_data):
    """A data module with a test split: its samples are scanned, and the longest of them sets the length."""

    class WithTest(JSON):
        def test_dataloader(self):
            test = type(self)(json_path=make_data([100, 120], [300, 95], name="test_split"))
            test.connect(self.tokenizer, self.batch_size, None if self.max_seq_length < 0 else self.max_seq_length)
            test.setup()
            return test.val_dataloader()

    fabric = L.Fabric(accelerator="cpu", devices=1)
    data = WithTest(json_path=make_data([100, 120], [90, 95]), num_workers=0)
    plan = length_plan.plan_lengths(fabric, data, Tokenizer(tiny_checkpoint), TrainArgs(), SeqArgs(headroom=0), 512)
    assert list(plan.lengths) == ["train", "val", "test"]
    assert plan.lengths["test"] == [300, 95]
    assert (plan.decision.longest, plan.decision.longest_split, plan.decision.max_seq_length) == (300, "test", 300)
    plain = length_plan.load_splits(
        fabric, JSON(json_path=make_data([100, 120], [90, 95], name="plain")), Tokenizer(tiny_checkpoint), 1, None
    )
    assert list(plain) == ["train", "val"]


@pytest.mark.e2e
def test_an_empty_test_split_is_reported_not_a_crash(tiny_checkpoint, make_data, tmp_path):
    class EmptyTest(JSON):
        def test_dataloader(self):
            return torch.utils.data.DataLoader([])

    fabric = L.Fabric(accelerator="cpu", devices=1)
    data = EmptyTest(json_path=make_data([100, 120], [90, 95]), num_workers=0)
    plan = length_plan.plan_lengths(fabric, data, Tokenizer(tiny_checkpoint), TrainArgs(), SeqArgs(), 512)
    report = build.publish_plan(
        fabric, tmp_path, plan, SeqArgs(), TrainArgs(micro_batch_size=1, global_batch_size=1), seed=0
    ).plan
    assert report["splits"]["test"]["count"] == 0 and report["longest"] == 120
    assert json.loads((tmp_path / "seq_lengths.json").read_text())["splits"]["test"]["max"] is None


def test_setup_refuses_a_flag_litgpt_does_not_have(tmp_path):
    with pytest.raises(finetune_lora.UserInputError, match="not_a_flag"):
        finetune_lora.setup(tmp_path, not_a_flag=1)
