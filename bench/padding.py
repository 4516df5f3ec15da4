"""Padding with random, length-grouped (--seq.group_by_length) and packed (--seq.pack) micro-batches, on real data.

    python bench/padding.py [--time-samples 64] [--epochs 5] [--time alpaca_en_demo] [--time-sizes 4]

For ../shared/data/alpaca_{en,zh}_demo.json, tokenized with the Llama 2 SentencePiece model and the Alpaca prompt
style, at micro_batch_size 4, 8 and 16 and max_seq_length as the flow decides it (longest + 10%):

* padding efficiency (real tokens / tokens the model processes) of random micro-batches (as litgpt's loader draws
  them: a seeded RandomSampler), of grouped ones (``data_utils.grouped_batches``) and of packed ones
  (``packing.packed_batches``: micro_batch_size rows of whole samples, each micro-batch padded to its longest row),
  averaged over a few epochs;
* the wall time of one epoch of the same samples, trained all three ways in this run by a tiny LoRA GPT (vocab
  32000) on CPU: a random subset of ``--time-samples`` samples, cut into random micro-batches, into grouped ones and
  into packed ones (over the subset), one micro-batch of each way in turn. A small subset groups and packs less
  tightly than the whole data set, so the table also gives the processed tokens of exactly the batches timed.

Prints a markdown table. Timings vary with the machine; nothing here fails on one.
"""

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from litgpt.data import SFTDataset
from litgpt.data.base import get_sft_collate_fn
from litgpt.lora import GPT, Config, mark_only_lora_as_trainable
from litgpt.prompts import Alpaca
from litgpt.tokenizer import Tokenizer

import data_utils
from litgpt_seqlen.data import packing
from litgpt_seqlen.data.scan import scan_parts
from litgpt_seqlen.training.loss import train_loss

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
SEED = 42  # litgpt's data modules' default seed


def load(name: str, tokenizer: Tokenizer) -> tuple[SFTDataset, list[int]]:
    samples = json.loads((SHARED / "data" / f"{name}.json").read_text())
    dataset = SFTDataset(samples, tokenizer, prompt_style=Alpaca(), max_seq_length=-1)
    return dataset, [p.length for p in scan_parts(dataset, name)]


def random_batches(n: int, micro_batch_size: int, epoch: int) -> list[list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SEED + epoch)).tolist()
    return [order[i : i + micro_batch_size] for i in range(0, n, micro_batch_size)]


def efficiency(lengths: list[int], micro_batch_size: int, epochs: int, max_seq_length: int) -> dict[str, float]:
    """Mean efficiency over ``epochs`` epochs of each way; ``samples_per_row`` of the packed rows."""
    measured = {"random": [], "grouped": [], "packed": [], "samples_per_row": []}
    for e in range(epochs):
        shuffled = random_batches(len(lengths), micro_batch_size, e)
        grouped = data_utils.grouped_batches(lengths, micro_batch_size, SEED, e)
        packed = packing.packed_batches(lengths, max_seq_length, micro_batch_size, SEED, e)
        measured["random"].append(data_utils.padding_efficiency(shuffled, lengths, max_seq_length)["efficiency"])
        measured["grouped"].append(data_utils.padding_efficiency(grouped, lengths, max_seq_length)["efficiency"])
        packed = packing.packing_efficiency(packed, lengths, max_seq_length)
        measured["packed"].append(packed["efficiency"])
        measured["samples_per_row"].append(packed["samples_per_row"])
    return {how: statistics.mean(values) for how, values in measured.items()}


def timed_batches(
    dataset: SFTDataset, lengths: list[int], chosen: list[int], micro_batch_size: int, max_seq_length: int
) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """One epoch of the ``chosen`` samples cut three ways, collated as the loaders collate them; and the tokens the
    model processes for each way."""
    subset = [lengths[i] for i in chosen]
    shuffled = [chosen[i : i + micro_batch_size] for i in range(0, len(chosen), micro_batch_size)]
    grouped = [[chosen[j] for j in b] for b in data_utils.grouped_batches(subset, micro_batch_size, SEED, 0)]
    packed = packing.packed_batches(subset, max_seq_length, micro_batch_size, SEED, 0)
    packed = [[[chosen[j] for j in row] for row in rows] for rows in packed]
    collate = get_sft_collate_fn(max_seq_length=-1)
    batches = {
        "random": [collate([dataset[i] for i in b]) for b in shuffled],
        "grouped": [collate([dataset[i] for i in b]) for b in grouped],
        "packed": [packing.packed_collate([[dataset[i] for i in row] for row in rows]) for rows in packed],
    }
    processed = {how: sum(b["input_ids"].numel() for b in micro_batches) for how, micro_batches in batches.items()}
    return batches, processed


def tiny_model() -> GPT:
    torch.manual_seed(0)
    config = Config(
        name="bench-tiny",
        block_size=1024,
        vocab_size=32000,
        padded_vocab_size=32000,
        n_layer=2,
        n_head=4,
        n_embd=64,
        rotary_percentage=1.0,
        parallel_residual=False,
        bias=False,
        norm_class_name="RMSNorm",
        mlp_class_name="LLaMAMLP",
        intermediate_size=128,
        lora_r=8,
        lora_alpha=16,
        lora_dropout=0.0,
        lora_query=True,
        lora_value=True,
    )
    model = GPT(config)
    mark_only_lora_as_trainable(model)
    model.max_seq_length = config.block_size
    return model


def train_step(model: GPT, optimizer: torch.optim.Optimizer, batch: dict) -> float:
    """Forward, backward and an optimizer step on one micro-batch, as fit runs them; returns the seconds taken."""
    started = time.perf_counter()
    train_loss(model, batch).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def timed_runs(model: GPT, runs: dict[str, list[dict]]) -> dict[str, float]:
    """Total training seconds of each run's micro-batches; the runs' steps are interleaved (one step of each in
    turn), so a busy moment on the machine falls on all of them alike."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    seconds = dict.fromkeys(runs, 0.0)
    for step in range(max(len(batches) for batches in runs.values())):
        for label, batches in runs.items():
            if step < len(batches):
                seconds[label] += train_step(model, optimizer, batches[step])
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-samples", type=int, default=64, help="samples each timed run trains on")
    parser.add_argument("--epochs", type=int, default=5, help="epochs the efficiency is averaged over")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--data", nargs="+", default=["alpaca_en_demo", "alpaca_zh_demo"])
    parser.add_argument("--time", nargs="*", default=["alpaca_en_demo"], help="data sets to time training on")
    parser.add_argument("--time-sizes", type=int, nargs="*", default=[4], help="micro_batch_sizes to time training at")
    args = parser.parse_args()
    if not (SHARED / "data").is_dir():
        print(f"skipped: {SHARED} is absent")
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tokenizer = Tokenizer(SHARED / "tokenizers" / "llama2-sentencepiece")
    model = tiny_model()
    item = {
        "input_ids": torch.ones(64, dtype=torch.long),
        "labels": torch.ones(64, dtype=torch.long),
        "token_counts": {"raw": 64, "raw_plus_prompt_template": 64},
    }
    warm_up = [get_sft_collate_fn()([item] * 2), packing.packed_collate([[item, item]] * 2)]
    timed_runs(model, {"warm-up": warm_up * 2})
    rows = []
    for name in args.data:
        dataset, lengths = load(name, tokenizer)
        max_seq_length = math.ceil(max(lengths) * 1.1)  # the flow's decision with the default headroom
        chosen = random.Random(SEED).sample(range(len(lengths)), min(args.time_samples, len(lengths)))
        for micro_batch_size in args.sizes:
            measured = efficiency(lengths, micro_batch_size, args.epochs, max_seq_length)
            timed = None
            if name in args.time and micro_batch_size in args.time_sizes:
                batches, processed = timed_batches(dataset, lengths, chosen, micro_batch_size, max_seq_length)
                seconds = timed_runs(model, batches)
                steps = {how: len(micro_batches) for how, micro_batches in batches.items()}
                timed = (steps, processed, seconds)
                print(
                    f"  {name} mbs {micro_batch_size}: " + ", ".join(f"{seconds[how]:.1f} s {how}" for how in seconds),
                    file=sys.stderr,
                )
            rows.append((name, micro_batch_size, max_seq_length, measured, timed))

    print(
        f"\nPadding efficiency (real / processed tokens), Llama 2 SentencePiece tokenizer, Alpaca prompt style,"
        f" max_seq_length = longest + 10%; averaged over {args.epochs} epochs. Wall time: one epoch of the same"
        f" {args.time_samples} samples each way, tiny LoRA GPT (2 layers, n_embd 64, vocab 32000), CPU,"
        f" {torch.get_num_threads()} threads.\n"
    )
    print(
        "| data | micro_batch_size | random | grouped | packed | samples per row | micro-batches r / g / p"
        " | processed tokens r / g / p | wall time r / g / p (s) | random ÷ grouped | random ÷ packed |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, micro_batch_size, max_seq_length, measured, timed in rows:
        shares = f"{measured['random']:.1%} | {measured['grouped']:.1%} | {measured['packed']:.1%}"
        line = f"| {name} | {micro_batch_size} | {shares} | {measured['samples_per_row']:.2f} |"
        if timed is None:
            print(line + " – | – | – | – | – |")
            continue
        steps, processed, seconds = timed
        ways = ("random", "grouped", "packed")
        print(
            line + f" {' / '.join(str(steps[w]) for w in ways)} | {' / '.join(str(processed[w]) for w in ways)} |"
            f" {' / '.join(f'{seconds[w]:.1f}' for w in ways)} | {seconds['random'] / seconds['grouped']:.2f}x |"
            f" {seconds['random'] / seconds['packed']:.2f}x |"
        )


if __name__ == "__main__":
    main()
