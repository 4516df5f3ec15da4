"""End to end: finetune_lora.py in a subprocess on a tiny checkpoint (block_size 512), asserting on the files it writes."""

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml
from jsonargparse import ActionConfigFile, ArgumentParser
from litgpt.finetune.lora import setup as litgpt_finetune_lora

from helpers import litgpt_here, read_report
from litgpt_seqlen.cli.parser import build_parser
from litgpt_seqlen.methods import LORA

pytestmark = pytest.mark.e2e


def assert_trained(out: Path, max_seq_length: int) -> None:
    final = out / "final"
    for name in (
        "lit_model.pth.lora",
        "lit_model.pth",
        "hyperparameters.yaml",
        "model_config.yaml",
        "prompt_style.yaml",
        "tokenizer.json",
    ):
        assert (final / name).is_file(), name
    assert (out / "logs").is_dir()
    hyperparameters = yaml.safe_load((final / "hyperparameters.yaml").read_text())
    assert hyperparameters["train"]["max_seq_length"] == max_seq_length


def test_val_longer_than_train(cli_here, tiny_checkpoint, make_data, tmp_path):
    """The reported crash: train tops out at 466 tokens, val at 473. Validation (initial, periodic, final) must run."""
    data = make_data([100, 466, 200, 150], [473, 90])
    out = tmp_path / "out"
    run = cli_here(
        data,
        out,
        "--eval.initial_validation",
        "true",
        "--eval.interval",
        "1",
        "--train.save_interval",
        "1",
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = read_report(out)
    # 473 * 1.1 = 520.3 -> 521, above the block_size 512 of this checkpoint, so capped.
    assert (report["longest"], report["longest_split"], report["max_seq_length"], report["capped"]) == (
        473,
        "val",
        512,
        True,
    )
    assert report["splits"]["val"]["max"] == 473 and report["splits"]["val"]["argmax"] == 0
    assert report["splits"]["train"]["max"] == 466
    assert_trained(out, 512)
    assert (out / "step-000001" / "lit_model.pth.lora").is_file()
    with open(next((out / "logs" / "csv").glob("version_*/metrics.csv"))) as f:
        logged = [row for row in csv.DictReader(f) if row.get("seq/max_seq_length")]
    assert logged and logged[0]["step"] == "0" and float(logged[0]["seq/val_max"]) == 473
    assert "max_seq_length = 512 (longest 473 in val" in run.stdout


def test_config_file_with_seq_group(cli_here, tiny_checkpoint, make_data, tmp_path):
    """A litgpt-style --config file works, and the --seq group can live in it."""
    config = tmp_path / "config.yaml"
    config.write_text("lora_r: 4\nseq:\n  headroom: 0.25\n")
    out = tmp_path / "out"
    run = cli_here(make_data([100, 300], [120, 200]), out, "--config", str(config))
    assert run.returncode == 0, run.stderr[-3000:]
    report = read_report(out)
    assert (report["max_seq_length"], report["source"], report["capped"], report["headroom"]) == (
        375,
        "auto",
        False,
        0.25,
    )
    assert_trained(out, 375)
    written = out / "final" / "hyperparameters.yaml"
    assert yaml.safe_load(written.read_text())["lora_r"] == 4

    # litgpt's own finetune_lora reads what this run wrote (its parser, built as litgpt's CLI builds it) ...
    upstream = ArgumentParser()
    upstream.add_argument("--config", action=ActionConfigFile)
    upstream.add_function_arguments(litgpt_finetune_lora, as_positional=True)
    assert upstream.parse_args(["--config", str(written)]).train.max_seq_length == 375
    # ... and this tool reruns it from that file and OUT_DIR/seq.yaml
    ours = build_parser(LORA).parse_args(["--config", str(written), "--config", str(out / "seq.yaml")])
    assert (ours.seq.headroom, ours.train.max_seq_length, ours.lora_r) == (0.25, 375, 4)


def test_sample_over_block_size_is_truncated_and_counted(cli_here, tiny_checkpoint, make_data, tmp_path):
    """`Cannot attend to 528, block size is only 512` upstream; here the sample is cut to 512 and the run completes."""
    out = tmp_path / "out"
    run = cli_here(make_data([528, 100, 200], [80, 90]), out, "--eval.initial_validation", "true")
    assert run.returncode == 0, run.stderr[-3000:]
    report = read_report(out)
    assert (report["longest"], report["max_seq_length"], report["capped"]) == (528, 512, True)
    assert report["splits"]["train"]["over_limit"] == 1 and report["splits"]["train"]["tokens_truncated"] == 16
    assert report["splits"]["val"]["over_limit"] == 0
    assert_trained(out, 512)


def test_override_below_longest_truncates(cli_here, tiny_checkpoint, make_data, tmp_path):
    out = tmp_path / "out"
    run = cli_here(make_data([100, 300], [250, 90]), out, "--train.max_seq_length", "200")
    assert run.returncode == 0, run.stderr[-3000:]
    report = read_report(out)
    assert (report["max_seq_length"], report["source"], report["capped"]) == (200, "override", False)
    assert report["splits"]["train"]["tokens_truncated"] == 100 and report["splits"]["val"]["tokens_truncated"] == 50
    assert_trained(out, 200)


def test_override_above_block_size_is_capped_with_warning(cli_here, tiny_checkpoint, make_data, tmp_path):
    out = tmp_path / "out"
    run = cli_here(make_data([100, 300], [250, 90]), out, "--train.max_seq_length", "4096")
    assert run.returncode == 0, run.stderr[-3000:]
    assert "4096" in run.stdout and "512" in run.stdout and "warning" in run.stdout
    report = read_report(out)
    assert (report["max_seq_length"], report["source"], report["capped"]) == (512, "override", True)
    assert_trained(out, 512)


def test_drop_loses_nothing(cli_here, tiny_checkpoint, make_data, tmp_path):
    train, val = [100, 300, 120, 280, 90], [250, 95, 80]
    data = make_data(train, val)
    out = tmp_path / "out"
    run = cli_here(data, out, "--train.max_seq_length", "200", "--seq.over_length", "drop")
    assert run.returncode == 0, run.stderr[-3000:]
    report = read_report(out)
    assert report["splits"]["train"]["dropped"] == 2 and report["splits"]["val"]["dropped"] == 1
    dropped = [json.loads(line) for line in (out / "dropped_samples.jsonl").read_text().splitlines()]
    assert [(d["split"], d["index"], d["length"], d["reason"]) for d in dropped] == [
        ("train", 1, 300, "over_length"),
        ("train", 3, 280, "over_length"),
        ("val", 0, 250, "over_length"),
    ]
    for name, lengths in (("train", train), ("val", val)):
        original = json.loads((data / f"{name}.json").read_text())
        kept = [original[i] for i, n in enumerate(lengths) if n <= 200]
        gone = [d["sample"] for d in dropped if d["split"] == name]
        assert len(kept) + len(gone) == len(original)
        assert sorted(map(json.dumps, kept + gone)) == sorted(map(json.dumps, original))  # unchanged, none lost
    assert_trained(out, 200)


def test_output_works_with_litgpt_generate(cli_here, tiny_checkpoint, make_data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    run = cli_here(make_data([100, 120], [110, 90]), out)
    assert run.returncode == 0
    # final/ is named where it is, never by the directory it was written in before the rename
    assert f"Saved the fine-tuned model to {out / 'final'}: hyperparameters.yaml, lit_model.pth," in run.stdout
    assert ".tmp-" not in run.stdout
    assert (
        litgpt_here(monkeypatch, "generate", str(out / "final"), "--prompt", "write a poem", "--max_new_tokens", "3")
        == 0
    )
    lora = torch.load(out / "final" / "lit_model.pth.lora")["model"]
    assert lora and all("lora_" in name for name in lora)


def test_a_rerun_into_the_same_out_dir_merges_its_own_weights(cli_here, make_data, tmp_path):
    """final/lit_model.pth is the merge of this run's LoRA weights, not an earlier run's left in place."""
    data, out = make_data([100, 120], [110, 90]), tmp_path / "out"
    frozen = '{"class_path": "torch.optim.SGD", "init_args": {"lr": 0.0}}'  # LoRA B stays 0: merged = base weights
    assert cli_here(data, out, "--optimizer", frozen, "--lora_r", "4").returncode == 0
    first = torch.load(out / "final" / "lit_model.pth", weights_only=True)
    assert cli_here(data, out, "--lora_r", "4").returncode == 0
    second = torch.load(out / "final" / "lit_model.pth", weights_only=True)
    lora = torch.load(out / "final" / "lit_model.pth.lora", weights_only=True)["model"]
    assert any(key.endswith("lora_B") and value.abs().sum() > 0 for key, value in lora.items())
    assert any(not torch.equal(first[key], second[key]) for key in first)
