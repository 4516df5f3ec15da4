"""The worst-case rehearsal (--seq.rehearse): the longest micro-batches run first, and leave no trace."""

import copy
import json
import random

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from litgpt.args import TrainArgs

import data_utils
from helpers import read_report, tiny_config
from litgpt_seqlen.data import length_plan
from litgpt_seqlen.training import rehearsal

# --- which samples: plain lists ------------------------------------------------------------------------------


def test_longest_batch_examples():
    assert data_utils.longest_batch([5, 9, 1, 9, 7], 2) == [1, 3]  # ties: the lower index first
    assert data_utils.longest_batch([5, 9, 1, 9, 7], 3) == [1, 3, 4]
    assert data_utils.longest_batch([3, 2], 4) == [0, 1]  # fewer samples than the batch size
    assert data_utils.longest_batch([], 2) == []
    with pytest.raises(ValueError):
        data_utils.longest_batch([1, 2], 0)


@given(st.lists(st.integers(1, 10_000), max_size=60), st.integers(1, 8))
def test_longest_batch_takes_the_longest(lengths, batch_size):
    chosen = data_utils.longest_batch(lengths, batch_size)
    assert len(chosen) == min(batch_size, len(lengths)) == len(set(chosen))
    rest = [n for i, n in enumerate(lengths) if i not in chosen]
    if chosen and rest:
        assert min(lengths[i] for i in chosen) >= max(rest)
    # its padded length is the longest sample's, which no other batch of this size exceeds
    assert max((lengths[i] for i in chosen), default=0) == max(lengths, default=0)


# --- the batch itself, from real loaders ---------------------------------------------------------------------


def loaders_for(checkpoint, data_dir, batch_size, max_seq_length):
    import lightning as L
    from litgpt.data import JSON
    from litgpt.tokenizer import Tokenizer

    fabric = L.Fabric(accelerator="cpu", devices=1)
    data = JSON(json_path=data_dir, num_workers=0)
    return length_plan.load_splits(fabric, data, Tokenizer(checkpoint), batch_size, max_seq_length)


def test_rehearsal_batch_is_the_longest(make_data, tiny_checkpoint):
    train, val = [64, 90, 66, 120, 70, 80], [62, 95, 65]
    splits = loaders_for(tiny_checkpoint, make_data(train, val), batch_size=2, max_seq_length=200)
    batches = rehearsal.rehearsal_batches(
        {"train": splits["train"], "val": splits["val"]}, {"train": train, "val": val}, 2
    )
    assert list(batches["train"]["input_ids"].shape) == [2, 120]
    assert list(batches["val"]["input_ids"].shape) == [2, 95]
    # exactly samples 3 and 1 as the loader's collate_fn builds them
    expected = splits["train"].collate_fn([splits["train"].dataset[3], splits["train"].dataset[1]])
    assert torch.equal(batches["train"]["input_ids"], expected["input_ids"])
    assert torch.equal(batches["train"]["labels"], expected["labels"])
    # no batch the training loader produces is larger
    assert max(b["input_ids"].shape[1] for b in splits["train"]) <= 120


def test_rehearsal_batch_is_cut_at_max_seq_length(make_data, tiny_checkpoint):
    train, val = [70, 90, 66], [62, 75]
    splits = loaders_for(tiny_checkpoint, make_data(train, val), batch_size=2, max_seq_length=64)
    batches = rehearsal.rehearsal_batches(
        {"train": splits["train"], "val": splits["val"]}, {"train": train, "val": val}, 2
    )
    assert list(batches["train"]["input_ids"].shape) == [2, 64]
    assert list(batches["val"]["input_ids"].shape) == [2, 64]


# --- it leaves no trace: in process --------------------------------------------------------------------------


@pytest.fixture
def tiny_run():
    """A Fabric-set-up LoRA GPT with dropout, an AdamW that has taken one step, and two hand-made batches."""
    import lightning as L
    from litgpt.lora import GPT, mark_only_lora_as_trainable

    fabric = L.Fabric(accelerator="cpu", devices=1, precision="32-true")
    fabric.seed_everything(3)
    config = tiny_config(
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.5,
        lora_query=True,
        lora_value=True,
        lora_mlp=True,
    )
    model = GPT(config)
    model.max_seq_length = 48
    mark_only_lora_as_trainable(model)
    model = fabric.setup_module(model)
    optimizer = fabric.setup_optimizers(torch.optim.AdamW((p for p in model.parameters() if p.requires_grad), lr=1e-2))
    batch = {"input_ids": torch.randint(0, 50, (2, 40)), "labels": torch.randint(0, 50, (2, 40))}
    fabric.backward(model(batch["input_ids"]).sum())
    optimizer.step()
    optimizer.zero_grad()
    batches = {
        "train": batch,
        "val": {"input_ids": torch.randint(0, 50, (2, 48)), "labels": torch.randint(0, 50, (2, 48))},
    }
    train_args = TrainArgs(global_batch_size=2, micro_batch_size=2)
    decision = data_utils.decide_max_seq_length({"train": [40], "val": [48]}, 64, 0.0)
    return fabric, model, optimizer, batches, train_args, decision


def rng_states():
    return random.getstate(), np.random.get_state(), torch.get_rng_state()


def draws(states):
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])
    return random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()


def test_rehearsal_leaves_weights_optimizer_and_rng_as_they_were(tiny_run):
    fabric, model, optimizer, batches, train_args, decision = tiny_run
    # the test means something only if a train-mode forward draws random numbers (LoRA dropout)
    before = torch.get_rng_state()
    model(batches["train"]["input_ids"])
    assert not torch.equal(before, torch.get_rng_state())

    weights = copy.deepcopy(model.state_dict())
    optimizer_state = copy.deepcopy(optimizer.state_dict())
    states = rng_states()
    result = rehearsal.rehearse(fabric, model, optimizer, batches, train_args)
    after = rng_states()

    assert result["train_batch"] == [2, 40] and result["val_batch"] == [2, 48] and result["seconds"] >= 0
    assert model.training and model.max_seq_length == 48
    assert all(p.grad is None for p in model.parameters())
    now = model.state_dict()
    assert weights.keys() == now.keys() and all(torch.equal(weights[k], now[k]) for k in weights)
    assert json.dumps(optimizer_state["param_groups"]) == json.dumps(optimizer.state_dict()["param_groups"])
    for key, state in optimizer_state["state"].items():
        for name, value in state.items():
            assert torch.equal(value, optimizer.state_dict()["state"][key][name])
    assert draws(after) == draws(states)


def test_rehearsal_out_of_memory_is_a_user_error(tiny_run, monkeypatch):
    fabric, model, optimizer, batches, train_args, decision = tiny_run

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("injected")

    monkeypatch.setattr(type(model.module), "forward", out_of_memory)
    with pytest.raises(rehearsal.OutOfMemory) as failed:
        rehearsal.rehearse(fabric, model, optimizer, batches, train_args)
    assert (failed.value.split, failed.value.shape, failed.value.detail) == ("train", [2, 40], "injected")
    message = rehearsal.out_of_memory_message(fabric.device, "train", [2, 40], decision)
    assert "2 × 40" in message and "cpu" in message
    for flag in (
        "--train.micro_batch_size",
        "--train.max_seq_length",
        "--seq.over_length",
        "--precision",
        "--quantize",
    ):
        assert flag in message
    assert model.training


# --- end to end ----------------------------------------------------------------------------------------------


def lora_weights(out_dir):
    state = torch.load(out_dir / "final" / "lit_model.pth.lora", weights_only=True)
    return state.get("model", state)


@pytest.mark.e2e
def test_final_weights_are_the_same_with_and_without_rehearsal(cli_here, make_data, tiny_checkpoint, tmp_path):
    # over_length drop makes the loaders' datasets Subsets: the rehearsal must map kept indices back
    data_dir = make_data([64, 90, 150, 70, 120, 66, 72, 80], [62, 130, 75, 68])
    flags = ("--train.max_seq_length", "128", "--seq.over_length", "drop")
    runs = {}
    for rehearse in ("true", "false"):
        out_dir = tmp_path / f"out_{rehearse}"
        done = cli_here(data_dir, out_dir, *flags, "--seq.rehearse", rehearse, steps=3)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[rehearse] = out_dir

    rehearsal = read_report(runs["true"])["rehearsal"]
    assert rehearsal["train_batch"] == [2, 120]  # 150 was dropped
    assert rehearsal["val_batch"] == [2, 75]  # 130 was dropped
    assert "rehearsal" not in read_report(runs["false"])
    on, off = lora_weights(runs["true"]), lora_weights(runs["false"])
    assert on.keys() == off.keys() and on
    assert all(torch.equal(on[k], off[k]) for k in on)
    assert any(v.abs().sum() > 0 for k, v in on.items() if "lora_B" in k)  # it did train


def test_out_of_memory_in_rehearsal_stops_with_a_clear_message(cli_here, make_data, tmp_path, monkeypatch):
    import litgpt.lora

    def out_of_memory(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    monkeypatch.setattr(litgpt.lora.GPT, "forward", out_of_memory)
    out_dir = tmp_path / "out"
    done = cli_here(make_data([64, 90], [62, 70]), out_dir, "--seq.fit_micro_batch", "false", steps=2)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    assert "error: out of memory" in done.stderr and "2 × 90" in done.stderr
    for flag in (
        "--train.micro_batch_size",
        "--train.max_seq_length",
        "--seq.over_length",
        "--precision",
        "--quantize",
    ):
        assert flag in done.stderr
    assert not (out_dir / "final").exists()
