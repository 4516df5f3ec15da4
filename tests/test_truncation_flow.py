"""Truncation in the flow: the plan, the loaders, the report, the rehearsal batch and the CLI.

The case: validation samples with 600-word instructions and 6-word answers, block_size 512 (the tiny
checkpoint), ``mask_prompt``. References: litgpt's own ``SFTDataset`` (with and without ``max_seq_length``) and the
tokenizer's encoding of the answer.
"""

import json
import math
import random
import re

import lightning as L
import pytest
import torch
from litgpt.args import TrainArgs
from litgpt.data import JSON, SFTDataset
from litgpt.tokenizer import Tokenizer

import assets
from helpers import loaders_for, read_report
from litgpt_seqlen.args import SeqArgs
from litgpt_seqlen.data import length_plan
from litgpt_seqlen.errors import UserInputError
from litgpt_seqlen.report import build
from litgpt_seqlen.training import rehearsal

IGNORE = -100
LIMIT = 512  # the tiny checkpoint's block_size: max_seq_length is capped at it


def long_prompt_sample(rng: random.Random) -> dict:
    return {
        "instruction": " ".join(rng.choices(assets.WORDS, k=600)),
        "input": "",
        "output": " ".join(rng.choices(assets.WORDS, k=6)),
    }


def short_sample(rng: random.Random) -> dict:
    words = lambda k: " ".join(rng.choices(assets.WORDS, k=k))  # noqa: E731
    return {"instruction": words(rng.randint(3, 12)), "input": words(rng.randint(0, 4)), "output": words(20)}


def write_data(directory, train: list[dict], val: list[dict]):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "train.json").write_text(json.dumps(train))
    (directory / "val.json").write_text(json.dumps(val))
    return directory


@pytest.fixture
def mixed_data(tmp_path):
    """train: 5 short samples and one long-prompt one (index 2); val: 3 long-prompt ones and a short one (index 3)."""
    rng = random.Random(0)
    train = [short_sample(rng) for _ in range(5)]
    train.insert(2, long_prompt_sample(rng))
    val = [long_prompt_sample(rng) for _ in range(3)] + [short_sample(rng)]
    return write_data(tmp_path / "data", train, val), {"train": train, "val": val}


def planned(tiny_checkpoint, data_dir, mask_prompt: bool, truncate_from: str):
    fabric = L.Fabric(accelerator="cpu", devices=1)
    data = JSON(json_path=data_dir, mask_prompt=mask_prompt, num_workers=0)
    seq = SeqArgs(truncate_from=truncate_from)
    plan = length_plan.plan_lengths(fabric, data, Tokenizer(tiny_checkpoint), TrainArgs(micro_batch_size=2), seq, LIMIT)
    return fabric, data, plan, seq


def upstream(samples, tiny_checkpoint, mask_prompt: bool, max_seq_length: int = -1) -> SFTDataset:
    return SFTDataset(
        samples,
        Tokenizer(tiny_checkpoint),
        prompt_style="alpaca",
        mask_prompt=mask_prompt,
        max_seq_length=max_seq_length,
    )


@pytest.mark.e2e
def test_prompt_first_keeps_every_answer_whole(tiny_checkpoint, mixed_data, tmp_path):
    data_dir, samples = mixed_data
    fabric, data, plan, seq = planned(tiny_checkpoint, data_dir, mask_prompt=True, truncate_from="prompt")
    assert plan.decision.max_seq_length == LIMIT
    assert plan.kept == {"train": list(range(6)), "val": list(range(4))} and plan.dropped == {"train": {}, "val": {}}
    report = build.publish_plan(
        fabric, tmp_path / "out", plan, seq, TrainArgs(micro_batch_size=2, global_batch_size=2), seed=0
    ).plan
    assert not (tmp_path / "out" / "dropped_samples.jsonl").exists()
    tokenizer = Tokenizer(tiny_checkpoint)
    lengths = {n: [len(item["input_ids"]) for item in upstream(s, tiny_checkpoint, True)] for n, s in samples.items()}
    assert lengths["val"][0] > LIMIT and lengths["val"][3] < LIMIT
    val = report["splits"]["val"]
    assert (val["truncated"], val["response_tokens_cut"], val["responses_cut"], val["eos_lost"]) == (3, 0, 0, 0)
    assert val["prompt_tokens_cut"] == sum(n - LIMIT for n in lengths["val"][:3]) == val["tokens_truncated"]
    assert val["unsupervised_dropped"] == 0 and report["truncate_from"] == "prompt"
    chosen = next(row for row in report["what_if"] if row["max_seq_length"] == LIMIT)
    assert chosen["response_tokens_cut_share"] == 0.0
    assert json.loads((tmp_path / "out" / "seq_lengths.json").read_text())["splits"]["val"] == val

    train_loader, val_loader = loaders_for(fabric, data, plan, 2)
    for i, sample in enumerate(samples["val"]):
        item = val_loader.dataset[i]
        answer = tokenizer.encode(sample["output"], bos=False, eos=True).tolist()
        assert len(item["input_ids"]) == min(lengths["val"][i], LIMIT)
        assert item["input_ids"][-len(answer) :].tolist() == answer  # the whole answer, with its EOS
        assert item["labels"][-len(answer) :].tolist() == answer
        assert (item["labels"][: -len(answer)] == IGNORE).all()  # the prompt, masked as litgpt masks it
        before_answer = tokenizer.decode(item["input_ids"][-len(answer) - 4 : -len(answer)])
        assert "### Response :" in before_answer
    for batch in val_loader:
        assert batch["input_ids"].shape[1] <= LIMIT

    loaders = {"train": train_loader, "val": val_loader}
    batches = rehearsal.rehearsal_batches(loaders, {n: plan.kept_lengths(n) for n in loaders}, 2)
    assert list(batches["val"]["input_ids"].shape) == [2, LIMIT]
    expected = val_loader.collate_fn([val_loader.dataset[0], val_loader.dataset[1]])  # the cut items
    assert torch.equal(batches["val"]["labels"], expected["labels"])
    assert ((batches["val"]["labels"][:, 1:] != IGNORE).sum(dim=1) == 7).all()  # 6 words + EOS


@pytest.mark.e2e
@pytest.mark.parametrize("mask_prompt", [True, False])
def test_end_is_upstreams_cut_and_drops_what_has_no_target(tiny_checkpoint, mixed_data, tmp_path, mask_prompt):
    data_dir, samples = mixed_data
    fabric, data, plan, seq = planned(tiny_checkpoint, data_dir, mask_prompt=mask_prompt, truncate_from="end")
    if mask_prompt:  # upstream keeps the first 512 prompt tokens: no answer token is left to learn from
        assert plan.dropped == {"train": {2: "unsupervised"}, "val": dict.fromkeys([0, 1, 2], "unsupervised")}
    else:
        assert plan.dropped == {"train": {}, "val": {}}
    report = build.publish_plan(
        fabric, tmp_path / "out", plan, seq, TrainArgs(micro_batch_size=2, global_batch_size=2), seed=0
    ).plan
    assert report["splits"]["val"]["unsupervised_dropped"] == (3 if mask_prompt else 0)
    path = tmp_path / "out" / "dropped_samples.jsonl"
    if mask_prompt:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        assert [(r["split"], r["index"], r["reason"]) for r in rows] == [
            ("train", 2, "unsupervised"),
            ("val", 0, "unsupervised"),
            ("val", 1, "unsupervised"),
            ("val", 2, "unsupervised"),
        ]
        assert rows[1]["sample"] == samples["val"][0]
    else:
        assert not path.exists()
        assert report["splits"]["val"]["response_tokens_cut"] == sum(
            len(s["output"].split()) + 1 for s in samples["val"][:3]
        )

    train_loader, val_loader = loaders_for(fabric, data, plan, 2)
    for name, loader in (("train", train_loader), ("val", val_loader)):
        reference = upstream(samples[name], tiny_checkpoint, mask_prompt, max_seq_length=LIMIT)
        for position, index in enumerate(plan.kept[name]):
            ours, theirs = loader.dataset[position], reference[index]
            assert torch.equal(ours["input_ids"], theirs["input_ids"])
            assert torch.equal(ours["labels"], theirs["labels"])
            assert ours["token_counts"] == theirs["token_counts"]


def test_a_split_with_no_target_left_is_an_error(tiny_checkpoint, tmp_path):
    rng = random.Random(1)
    data_dir = write_data(tmp_path / "data", [short_sample(rng) for _ in range(4)], [long_prompt_sample(rng)] * 2)
    with pytest.raises(
        UserInputError, match=r"Every remaining val sample \(2: val\[0\], val\[1\]\) has no token"
    ) as error:
        planned(tiny_checkpoint, data_dir, mask_prompt=True, truncate_from="end")
    assert "--seq.truncate_from prompt" in str(error.value) and "--data.mask_prompt false" in str(error.value)


# ---------------------------------------------------------------------------------------------------------------
# Long prompts and short answers through the CLI
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def long_prompt_data(tmp_path):
    """6 short train samples; 4 val samples with 600-word instructions and 6-word answers."""
    rng = random.Random(2)
    return write_data(
        tmp_path / "data", [short_sample(rng) for _ in range(6)], [long_prompt_sample(rng) for _ in range(4)]
    )


@pytest.mark.e2e
def test_cli_long_prompts_give_a_finite_val_loss(cli_here, tiny_checkpoint, long_prompt_data, tmp_path):
    out = tmp_path / "out"
    run = cli_here(long_prompt_data, out, "--data.mask_prompt", "true")
    assert run.returncode == 0, run.stderr[-3000:]
    final = re.search(r"Final evaluation \| val loss: (\S+) \| val ppl: (\S+)", run.stdout)
    assert final and math.isfinite(float(final.group(1))) and math.isfinite(float(final.group(2))), run.stdout[-2000:]
    val = read_report(out)["splits"]["val"]
    assert (val["truncated"], val["response_tokens_cut"], val["eos_lost"], val["unsupervised_dropped"]) == (4, 0, 0, 0)
    assert "cut samples (--seq.truncate_from prompt):" in run.stdout and "unsupervised_dropped" in run.stdout
    assert "response tokens cut" in run.stdout


@pytest.mark.e2e
def test_cli_end_drops_the_samples_upstream_would_validate_to_nan(
    cli_here, tiny_checkpoint, long_prompt_data, tmp_path
):
    """Upstream's cut leaves these samples no target (litgpt's loss on them is NaN: test_truncation shows it with
    SFTDataset itself); they are dropped as unsupervised, and with none left to validate on the run stops."""
    out = tmp_path / "out"
    run = cli_here(long_prompt_data, out, "--data.mask_prompt", "true", "--seq.truncate_from", "end")
    assert run.returncode == 2, run.stderr[-3000:]
    assert "error: Every remaining val sample (4: val[0] (position 0 of " in run.stderr  # named in the user's file
    assert "val[3] (position 3 of " in run.stderr and ") has no token to learn from" in run.stderr
    assert "--seq.truncate_from prompt" in run.stderr and "Traceback" not in run.stderr
