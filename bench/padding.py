"""Padding with random vs length-grouped micro-batches (--seq.group_by_length), on real data with a real tokenizer.

    python bench/padding.py [--time-samples 64] [--epochs 5] [--time alpaca_en_demo]

For ../shared/data/alpaca_{en,zh}_demo.json, tokenized with the Llama 2 SentencePiece model and the Alpaca prompt
style, at micro_batch_size 4, 8 and 16:

* padding efficiency (real tokens / tokens the model processes) of random micro-batches (as litgpt's loader draws
  them: a seeded RandomSampler) and of grouped ones (``data_utils.grouped_batches``), averaged over a few epochs;
* the wall time of training a tiny LoRA GPT (vocab 32000) on CPU over the same samples both ways, in this run,
  as a ratio: a random subset of ``--time-samples`` samples, cut into random micro-batches and into grouped ones
  (``grouped_batches`` over the subset), one step of each in turn. A small subset groups less tightly than the
  whole data set, so the table also gives the padded-token ratio of exactly the batches timed.

Prints a markdown table. Timings vary with the machine; nothing here fails on one.
"""

import argparse
import json
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
from training_loss import train_loss

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
SEED = 42  # litgpt's data modules' default seed


def load(name: str, tokenizer: Tokenizer) -> tuple[SFTDataset, list[int]]:
    samples = json.loads((SHARED / "data" / f"{name}.json").read_text())
    dataset = SFTDataset(samples, tokenizer, prompt_style=Alpaca(), max_seq_length=-1)
    return dataset, [p.length for p in data_utils.scan_parts(dataset, name)]


def random_batches(n: int, micro_batch_size: int, epoch: int) -> list[list[int]]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SEED + epoch)).tolist()
    return [order[i : i + micro_batch_size] for i in range(0, n, micro_batch_size)]


def efficiency(lengths: list[int], micro_batch_size: int, epochs: int) -> tuple[float, float]:
    shuffled = [
        data_utils.padding_efficiency(random_batches(len(lengths), micro_batch_size, e), lengths)["efficiency"]
        for e in range(epochs)
    ]
    grouped = [
        data_utils.padding_efficiency(data_utils.grouped_batches(lengths, micro_batch_size, SEED, e), lengths)[
            "efficiency"
        ]
        for e in range(epochs)
    ]
    return statistics.mean(shuffled), statistics.mean(grouped)


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
    args = parser.parse_args()
    if not (SHARED / "data").is_dir():
        print(f"skipped: {SHARED} is absent")
        return
    torch.set_num_threads(max(1, torch.get_num_threads()))
    tokenizer = Tokenizer(SHARED / "tokenizers" / "llama2-sentencepiece")
    model = tiny_model()
    warm_up = get_sft_collate_fn()(
        [
            {
                "input_ids": torch.ones(64, dtype=torch.long),
                "labels": torch.ones(64, dtype=torch.long),
                "token_counts": {"raw": 64, "raw_plus_prompt_template": 64},
            }
        ]
        * 2
    )
    timed_runs(model, {"warm-up": [warm_up] * 2})
    rows = []
    for name in args.data:
        dataset, lengths = load(name, tokenizer)
        collate = get_sft_collate_fn(max_seq_length=-1)
        for micro_batch_size in args.sizes:
            shuffled_eff, grouped_eff = efficiency(lengths, micro_batch_size, args.epochs)
            # Timing: a random subset of the samples, batched at random and grouped (the same function, on the subset).
            chosen = random.Random(SEED).sample(range(len(lengths)), min(args.time_samples, len(lengths)))
            shuffled = [chosen[i : i + micro_batch_size] for i in range(0, len(chosen), micro_batch_size)]
            subset_lengths = [lengths[i] for i in chosen]
            grouped = [
                [chosen[j] for j in batch]
                for batch in data_utils.grouped_batches(subset_lengths, micro_batch_size, SEED, 0)
            ]
            steps = len(shuffled)
            timed = None
            if name in args.time:
                runs = {"random": shuffled, "grouped": grouped}
                seconds = timed_runs(
                    model,
                    {label: [collate([dataset[i] for i in b]) for b in batches] for label, batches in runs.items()},
                )
                timed = {label: (seconds[label], data_utils.padding_efficiency(runs[label], lengths)) for label in runs}
                print(
                    f"  {name} mbs {micro_batch_size}: {seconds['random']:.1f} s random, {seconds['grouped']:.1f} s grouped",
                    file=sys.stderr,
                )
            rows.append((name, micro_batch_size, shuffled_eff, grouped_eff, steps, timed))

    print(
        f"\nPadding efficiency (real / processed tokens), Llama 2 SentencePiece tokenizer, Alpaca prompt style;"
        f" efficiency averaged over {args.epochs} epochs. Wall time: tiny LoRA GPT (2 layers, n_embd 64, vocab 32000),"
        f" CPU, {torch.get_num_threads()} threads, the same samples both ways.\n"
    )
    print(
        "| data | micro_batch_size | random | grouped | timed steps | padded tokens random / grouped | wall time random / grouped |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, micro_batch_size, shuffled_eff, grouped_eff, steps, timed in rows:
        if timed is None:
            print(f"| {name} | {micro_batch_size} | {shuffled_eff:.1%} | {grouped_eff:.1%} | – | – | – |")
            continue
        (t_random, p_random), (t_grouped, p_grouped) = timed["random"], timed["grouped"]
        print(
            f"| {name} | {micro_batch_size} | {shuffled_eff:.1%} | {grouped_eff:.1%} | {steps} |"
            f" {p_random['padded_tokens'] / p_grouped['padded_tokens']:.2f}x | {t_random / t_grouped:.2f}x |"
        )


if __name__ == "__main__":
    main()
