"""--seq.pack in the flow: the refusals in setup, the packed train loader from make_loaders, the rehearsal's
packed micro-batch, and a short packed run through the CLI against an unpacked one."""

import math
import random
import re
import shutil

import lightning as L
import pytest
import torch
from litgpt.args import TrainArgs
from litgpt.data import JSON
from litgpt.tokenizer import Tokenizer

import finetune_lora
from helpers import loaders_for, read_report
from litgpt_seqlen.args import SeqArgs
from litgpt_seqlen.data import length_plan
from litgpt_seqlen.data.packing import PackedRows
from litgpt_seqlen.errors import UserInputError
from litgpt_seqlen.training import rehearsal


def sliding_window_checkpoint(tiny_checkpoint, tmp_path):
    """The tiny checkpoint, its config given a sliding window, and a weights file that cannot be read."""
    directory = tmp_path / "windowed"
    shutil.copytree(tiny_checkpoint, directory)
    config = directory / "model_config.yaml"
    config.write_text(config.read_text() + "sliding_window_size: 16\n")
    (directory / "lit_model.pth").write_bytes(b"not a checkpoint: reading it would fail differently")
    return directory


def test_sliding_window_models_are_refused_before_the_weights(tiny_checkpoint, make_data, tmp_path):
    checkpoint = sliding_window_checkpoint(tiny_checkpoint, tmp_path)
    data = JSON(json_path=make_data([60, 70], [60]), num_workers=0)
    with pytest.raises(UserInputError, match="sliding-window attention"):
        finetune_lora.setup(checkpoint, seq=SeqArgs(pack=True), data=data, out_dir=tmp_path / "out")


def test_pack_and_group_by_length_exclude_each_other(tiny_checkpoint, tmp_path):
    with pytest.raises(UserInputError, match="--seq.pack true and --seq.group_by_length true"):
        finetune_lora.setup(tiny_checkpoint, seq=SeqArgs(pack=True, group_by_length=True), out_dir=tmp_path / "out")


def test_token_weighting_is_packings_default_and_batch_is_refused(tiny_checkpoint, tmp_path):
    assert SeqArgs(pack=True).token_weighting
    assert SeqArgs(loss_weighting="token").token_weighting and not SeqArgs().token_weighting
    with pytest.raises(UserInputError, match="--seq.pack true and --seq.loss_weighting batch exclude each other"):
        finetune_lora.setup(tiny_checkpoint, seq=SeqArgs(pack=True, loss_weighting="batch"), out_dir=tmp_path / "out")


def test_packed_train_loader_and_its_rehearsal_batch(tiny_checkpoint, make_data):
    """Through the length plan and the loaders: over-length samples dropped (a Subset), the rest packed into rows of at most max_seq_length,
    every kept sample in every epoch (those of the row that fills the last step twice), each one whole; validation
    unpacked; the rehearsal takes the fullest rows through the loader's own collate."""
    train = [60, 70, 65, 120, 62, 100, 200, 64, 66, 110, 61]  # 200 is over the limit: dropped
    val = [90, 75]
    fabric = L.Fabric(accelerator="cpu", devices=1)
    data = JSON(json_path=make_data(train, val), num_workers=0)
    tokenizer = Tokenizer(tiny_checkpoint)
    seq = SeqArgs(pack=True, over_length="drop")
    plan = length_plan.plan_lengths(
        fabric, data, tokenizer, TrainArgs(micro_batch_size=2, max_seq_length=130), seq, 512
    )
    assert plan.decision.max_seq_length == 130 and plan.kept["train"] == [i for i, n in enumerate(train) if n <= 130]
    train_loader, val_loader = loaders_for(fabric, data, plan, 2, "packed", seed=1)
    assert "segment_lengths" not in next(iter(val_loader))

    for _ in range(2):  # two epochs, packed differently
        seen = []
        for batch in train_loader:
            assert batch["input_ids"].size(0) <= 2 and batch["input_ids"].size(1) <= 130
            for row_ids, row_lengths in zip(batch["input_ids"], batch["segment_lengths"]):
                pieces = row_ids.split([*row_lengths, len(row_ids) - sum(row_lengths)])
                seen += [piece.tolist() for piece in pieces[:-1]]
        expected = [train_loader.dataset.dataset[i]["input_ids"].tolist() for i in range(len(plan.kept["train"]))]
        # 7 rows (below): the epoch's last micro-batch of 2 rows is filled with its first row, repeated
        assert {tuple(piece) for piece in seen} == {tuple(piece) for piece in expected} and len(seen) > len(expected)

    assert isinstance(train_loader.dataset, PackedRows)
    lengths = {"train": plan.kept_lengths("train"), "val": plan.kept_lengths("val")}
    batches = rehearsal.rehearsal_batches({"train": train_loader, "val": val_loader}, lengths, 2, 130)
    # best fit at 130: [120], [110], [100], [70, 60], [66, 64], [65, 62], [61]: the two full rows, two samples each
    assert batches["train"]["input_ids"].shape == (2, 130)
    assert sorted(batches["train"]["segment_lengths"]) == [[66, 64], [70, 60]]  # full rows
    assert list(batches["val"]["input_ids"].shape) == [2, 90]


def iter_lines_val(stdout: str) -> list[str]:
    return re.findall(r"\| loss train: ([\d.]+|nan), val: ([\d.]+|n/a)", stdout)


@pytest.mark.e2e
def test_cli_packed_run_against_an_unpacked_one(cli_here, tiny_checkpoint, make_data, tmp_path):
    """A short packed run with accumulation completes; validation is unpacked, so its initial val loss is the unpacked
    run's; the report says packed, with more than one sample per row and less padding; the final LoRA weights are
    finite and trained."""
    rng = random.Random(3)
    train = [rng.choice([60, 65, 80, 100, 150]) for _ in range(24)]
    data = make_data(train, [60, 80, 120, 70])
    flags = ("--train.global_batch_size", "4", "--train.max_seq_length", "300", "--eval.initial_validation", "true")
    runs, reports = {}, {}
    for pack in ("false", "true"):
        out = tmp_path / f"out_{pack}"
        runs[pack] = run = cli_here(data, out, *flags, "--seq.pack", pack, steps=3)
        assert run.returncode == 0, run.stderr[-3000:]
        reports[pack] = read_report(out)

    initial = {pack: iter_lines_val(run.stdout)[0][1] for pack, run in runs.items()}
    assert initial["true"] == initial["false"] != "n/a"

    packed, unpacked = reports["true"]["batches"], reports["false"]["batches"]
    assert packed["packed"] is True and unpacked["packed"] is False
    assert packed["loss_weighting"] == "token" and unpacked["loss_weighting"] == "batch"
    assert packed["attention"] == "segments" and unpacked["attention"] is None  # CPU, no softcapping
    assert "Packed attention: segments, causal attention on each sample's slice of a row" in runs["true"].stdout
    assert "Packed attention" not in runs["false"].stdout
    assert packed["count"] == 6 and packed["rows"] <= 12 and packed["samples"] > packed["rows"]
    assert packed["samples_per_row"] == round(packed["samples"] / packed["rows"], 3) > 1
    assert unpacked["samples_per_row"] == 1 and unpacked["rows"] == 12
    assert packed["efficiency"] > unpacked["efficiency"]
    assert reports["true"]["batches_estimate"]["packed"] is True
    assert set(reports["true"]["expected_efficiency"]) == {"random", "grouped", "packed"}
    assert "expected share of real tokens in train batches" in runs["true"].stdout
    rows, width = reports["true"]["rehearsal"]["train_batch"]
    assert rows == 2 and width <= 300

    losses = [float(train_loss) for train_loss, _ in iter_lines_val(runs["true"].stdout)]
    assert len(losses) == 6 and all(math.isfinite(loss) for loss in losses)
    weights = torch.load(tmp_path / "out_true" / "final" / "lit_model.pth.lora", weights_only=True)["model"]
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
    assert any(w.abs().sum() > 0 for name, w in weights.items() if "lora_B" in name)  # trained: B starts at zero
