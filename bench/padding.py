"""Padding with random, length-grouped (--seq.group_by_length) and packed (--seq.pack) micro-batches, on real data.

    python bench/padding.py [--time-samples 64] [--epochs 5] [--time-sizes 4] [--long-factor 20] [--repeats 3]
                            [--threads 1]

For ../shared/data/alpaca_{en,zh}_demo.json, tokenized with the Llama 2 SentencePiece model and the Alpaca prompt
style, at micro_batch_size 4, 8 and 16 and max_seq_length as the flow decides it (longest + 10%):

* padding efficiency (real tokens / tokens the model processes) of random micro-batches (as litgpt's loader draws
  them: a seeded RandomSampler), of grouped ones (``data_utils.grouped_batches``) and of packed ones
  (``packing.packed_batches``: micro_batch_size rows of whole samples, each micro-batch padded to its longest row),
  averaged over a few epochs;
* the wall time of one epoch of the same samples, trained all ways in this run by a tiny LoRA GPT (vocab 32000) on
  CPU: a random subset of ``--time-samples`` samples, cut into random micro-batches, into grouped ones and into packed
  ones (over the subset), the packed ones twice, once per attention path (``dense``: the block-causal mask over each
  whole row; ``segments``: attention within each sample); each way's epoch in turn, the median of ``--repeats``. A
  small subset groups and packs less tightly than the whole data set, so the table gives the tokens processed;
* the attention product alone over the timed packed micro-batches, per path;
* a long-tailed case: the same subset plus one sample ``--long-factor`` times the subset's median length (Alpaca
  samples joined into one), each way trained in a process of its own, with its wall time and its peak memory (the
  process's peak resident set above what it held before the first step).

Every timing runs on ``--threads`` torch threads (default 1, printed: the same on a machine of any size; more threads
than free cores make the timings swing).
Each ratio is computed per round (the ways timed one after another), and printed with every round's value and the
spread (min / median / max); where the rounds disagree on which way is faster, it says "within noise".

Prints markdown tables. Timings vary with the machine; nothing here fails on one.
"""

import argparse
import json
import math
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from litgpt.data import SFTDataset
from litgpt.data.base import get_sft_collate_fn
from litgpt.lora import GPT as LoraGPT
from litgpt.lora import Config, mark_only_lora_as_trainable
from litgpt.prompts import Alpaca
from litgpt.tokenizer import Tokenizer

import data_utils
from litgpt_seqlen.data import packing
from litgpt_seqlen.data.scan import scan_parts
from litgpt_seqlen.model.packed_attention import SegmentMask, block_causal_mask
from litgpt_seqlen.model.packed_forward import packed_gpt
from litgpt_seqlen.training.loss import train_loss

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
SEED = 42  # litgpt's data modules' default seed

GPT = packed_gpt(LoraGPT)  # LoRA's GPT, whose forward also takes packed rows


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


def cut_three_ways(lengths: list[int], chosen: list[int], micro_batch_size: int, max_seq_length: int) -> dict:
    """One epoch of the ``chosen`` samples as micro-batches of sample indices (packed: of rows of them)."""
    subset = [lengths[i] for i in chosen]
    packed = packing.packed_batches(subset, max_seq_length, micro_batch_size, SEED, 0)
    return {
        "random": [chosen[i : i + micro_batch_size] for i in range(0, len(chosen), micro_batch_size)],
        "grouped": [[chosen[j] for j in b] for b in data_utils.grouped_batches(subset, micro_batch_size, SEED, 0)],
        "packed": [[[chosen[j] for j in row] for row in rows] for rows in packed],
    }


def collated(dataset, cut: dict) -> dict[str, list[dict]]:
    """The micro-batches of (some of) ``cut_three_ways`` collated as the loaders collate them."""
    collate = get_sft_collate_fn(max_seq_length=-1)

    def one(way: str, batch: list) -> dict:
        if way == "packed":
            return packing.packed_collate([[dataset[i] for i in row] for row in batch])
        return collate([dataset[i] for i in batch])

    return {way: [one(way, batch) for batch in batches] for way, batches in cut.items()}


# The ways timed: how the samples are cut, and the attention path of packed rows.
WAYS = {"random": ("random", None), "grouped": ("grouped", None)}
WAYS.update({f"packed {path}": ("packed", path) for path in ("dense", "segments")})
# The wall-time ratios whose spread is printed (numerator, denominator: above 1, the denominator is faster).
RATIOS = [("random", way) for way in WAYS if way != "random"]
RATIOS += [("grouped", "packed segments"), ("packed dense", "packed segments")]


def tiny_model(block_size: int = 1024) -> GPT:
    torch.manual_seed(0)
    config = Config(
        name="bench-tiny",
        block_size=block_size,
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


def train_step(model: GPT, optimizer: torch.optim.Optimizer, batch: dict, path: str | None) -> float:
    """Forward, backward and an optimizer step on one micro-batch, as fit runs them; returns the seconds taken."""
    if path is not None:
        model.packed_attention = path
    started = time.perf_counter()
    train_loss(model, batch).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def timed_runs(model: GPT, runs: dict[str, tuple[list[dict], str | None]], repeats: int = 1) -> dict[str, list[float]]:
    """Training seconds of one epoch of each run (``runs``: label -> (micro-batches, packed attention path)): each
    run's whole epoch in turn, ``repeats`` rounds with the order rotated; per run, a list of one value a round. Whole
    epochs, not one step of each in turn: the packed epoch has a third of the steps, so in turn it would run only in
    the first third of the time, and what the machine does then (its allocator and caches first meeting the large
    shapes) would fall on it alone."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    seconds = {label: [] for label in runs}
    labels = list(runs)
    for repeat in range(repeats):
        for label in labels[repeat % len(labels) :] + labels[: repeat % len(labels)]:
            batches, path = runs[label]
            seconds[label].append(sum(train_step(model, optimizer, batch, path) for batch in batches))
    return seconds


def spread(ratios: list[float], numerator: str, denominator: str) -> dict:
    """Min, median and max of the seconds of ``numerator`` ÷ those of ``denominator``, measured once per round, and
    what they say: which is faster when every round agrees, "within noise" when the range reaches or crosses 1."""
    low, high = min(ratios), max(ratios)
    verdict = "within noise" if low <= 1.0 <= high else f"{denominator if low > 1.0 else numerator} faster"
    return {"rounds": list(ratios), "min": low, "median": statistics.median(ratios), "max": high, "verdict": verdict}


def per_round(seconds: dict[str, list[float]], numerator: str, denominator: str) -> dict:
    """The spread of ``numerator`` ÷ ``denominator``, round by round (both timed in the same rounds)."""
    ratios = [a / b for a, b in zip(seconds[numerator], seconds[denominator], strict=True)]
    return spread(ratios, numerator, denominator)


def warm_up(model: GPT) -> None:
    item = {
        "input_ids": torch.ones(64, dtype=torch.long),
        "labels": torch.ones(64, dtype=torch.long),
        "token_counts": {"raw": 64, "raw_plus_prompt_template": 64},
    }
    batches = [get_sft_collate_fn()([item] * 2), packing.packed_collate([[item, item]] * 2)]
    timed_runs(
        model,
        {
            "plain": (batches[:1] * 2, None),
            "dense": (batches[1:] * 2, "dense"),
            "segments": (batches[1:] * 2, "segments"),
        },
    )


def long_tail_data(tokenizer: Tokenizer, time_samples: int, factor: int) -> tuple[SFTDataset, list[int], list[int]]:
    """alpaca_en_demo's timed subset plus one sample (the last) at least ``factor`` times the subset's median length:
    the outputs of samples outside the subset joined into one answer. Returns the dataset, its lengths and the
    order of its samples (shuffled: the long one among the others)."""
    samples = json.loads((SHARED / "data" / "alpaca_en_demo.json").read_text())
    chosen = random.Random(SEED).sample(range(len(samples)), min(time_samples, len(samples)))  # as main chooses
    subset = [samples[i] for i in chosen]

    def lengths_of(samples: list[dict]) -> list[int]:
        dataset = SFTDataset(samples, tokenizer, prompt_style=Alpaca(), max_seq_length=-1)
        return [p.length for p in scan_parts(dataset, "long-tail")]

    lengths = lengths_of(subset)
    target = factor * statistics.median(lengths)
    long_sample = {"instruction": "Answer each of these in turn.", "input": "", "output": ""}
    for i in sorted(set(range(len(samples))) - set(chosen)):
        long_sample["output"] += samples[i]["output"] + "\n\n"
        if len(tokenizer.encode(long_sample["output"])) > target:
            break
    samples = subset + [long_sample]
    dataset = SFTDataset(samples, tokenizer, prompt_style=Alpaca(), max_seq_length=-1)
    lengths += lengths_of([long_sample])
    order = list(range(len(samples)))
    random.Random(SEED).shuffle(order)  # random micro-batches: the long sample among others, as a loader would draw
    return dataset, lengths, order


def one_way_in_this_process(way: str, time_samples: int, factor: int) -> None:
    """Trains one epoch of the long-tailed data one way; prints its seconds and peak memory as JSON."""
    tokenizer = Tokenizer(SHARED / "tokenizers" / "llama2-sentencepiece")
    dataset, lengths, chosen = long_tail_data(tokenizer, time_samples, factor)
    max_seq_length = math.ceil(max(lengths) * 1.1)
    model = tiny_model(block_size=max_seq_length)
    warm_up(model)
    cut, path = WAYS[way]
    batches = collated(dataset, {cut: cut_three_ways(lengths, chosen, 4, max_seq_length)[cut]})[cut]
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    (seconds,) = timed_runs(model, {way: (batches, path)})[way]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    processed = sum(b["input_ids"].numel() for b in batches)
    print(
        json.dumps(
            {
                "seconds": seconds,
                "peak_mib": (peak - before) / 1024,
                "steps": len(batches),
                "processed": processed,
                "longest": max(lengths),
                "median": statistics.median(lengths),
                "max_seq_length": max_seq_length,
            }
        )
    )


def long_tail(time_samples: int, factor: int, repeats: int, threads: int) -> dict[str, dict]:
    """Each way's run on the long-tailed data, ``repeats`` times (the ways in turn); the median seconds, the
    seconds of every round and the largest peak memory of each."""
    runs = {way: [] for way in WAYS}
    for _ in range(repeats):
        for way in WAYS:
            command = [sys.executable, __file__, "--one-way", way, "--time-samples", str(time_samples)]
            command += ["--threads", str(threads)]
            done = subprocess.run(command + ["--long-factor", str(factor)], capture_output=True, text=True, check=True)
            runs[way].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(
                f"  long tail, {way}: {runs[way][-1]['seconds']:.1f} s, {runs[way][-1]['peak_mib']:.0f} MiB",
                file=sys.stderr,
            )
    return {
        way: {
            **results[0],
            "seconds": statistics.median(r["seconds"] for r in results),
            "rounds": [r["seconds"] for r in results],
            "peak_mib": max(r["peak_mib"] for r in results),
        }
        for way, results in runs.items()
    }


def attention_alone(batches: list[dict], repeats: int) -> dict[str, list[float]]:
    """Milliseconds of one attention product (forward and backward, 4 heads of 16, float32) over the rows of each
    packed micro-batch, summed over the micro-batches: per path, one value for each of ``repeats`` rounds."""
    milliseconds = {path: [] for path in ("dense", "segments")}
    generator = torch.Generator().manual_seed(SEED)
    for _ in range(repeats):
        for path in milliseconds:
            total = 0.0
            for batch in batches:
                rows, width = batch["input_ids"].shape
                q, k, v = (torch.randn(rows, 4, width, 16, generator=generator, requires_grad=True) for _ in range(3))
                if path == "dense":
                    mask = block_causal_mask(batch["segment_lengths"], width)
                else:
                    mask = SegmentMask(batch["segment_lengths"], width, path)
                started = time.perf_counter()
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask).sum().backward()
                total += time.perf_counter() - started
            milliseconds[path].append(total * 1000)
    return milliseconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time-samples", type=int, default=64, help="samples each timed run trains on")
    parser.add_argument("--epochs", type=int, default=5, help="epochs the efficiency is averaged over")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--data", nargs="+", default=["alpaca_en_demo", "alpaca_zh_demo"])
    parser.add_argument("--time", nargs="*", default=["alpaca_en_demo"], help="data sets to time training on")
    parser.add_argument("--time-sizes", type=int, nargs="*", default=[4], help="micro_batch_sizes to time training at")
    parser.add_argument("--long-factor", type=int, default=20, help="the long sample's length over the median; 0: skip")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds of each way; the median is shown")
    parser.add_argument("--threads", type=int, default=1, help="torch threads every timing runs on (at least 1)")
    parser.add_argument("--one-way", choices=list(WAYS), help=argparse.SUPPRESS)  # one long-tail run, in a child
    args = parser.parse_args()
    if not ((SHARED / "data").is_dir() and (SHARED / "tokenizers").is_dir()):
        print(
            f"skipped: this bench reads {SHARED}/data and {SHARED}/tokenizers, the project's shared assets beside the clone"
        )
        return
    torch.set_num_threads(max(1, args.threads))
    if args.one_way:
        one_way_in_this_process(args.one_way, args.time_samples, args.long_factor)
        return
    tokenizer = Tokenizer(SHARED / "tokenizers" / "llama2-sentencepiece")
    model = tiny_model()
    warm_up(model)
    print(f"torch threads: {torch.get_num_threads()} (--threads)", file=sys.stderr)
    rows, attention, spreads = [], {}, []
    for name in args.data:
        dataset, lengths = load(name, tokenizer)
        max_seq_length = math.ceil(max(lengths) * 1.1)  # the flow's decision with the default headroom
        chosen = random.Random(SEED).sample(range(len(lengths)), min(args.time_samples, len(lengths)))
        for micro_batch_size in args.sizes:
            measured = efficiency(lengths, micro_batch_size, args.epochs, max_seq_length)
            timed = None
            if name in args.time and micro_batch_size in args.time_sizes:
                batches = collated(dataset, cut_three_ways(lengths, chosen, micro_batch_size, max_seq_length))
                runs = {way: (batches[cut], path) for way, (cut, path) in WAYS.items()}
                seconds = timed_runs(model, runs, args.repeats)
                attention[name, micro_batch_size] = attention_alone(batches["packed"], args.repeats)
                spreads += [
                    (f"{name} mbs {micro_batch_size}, wall time", f"{a} ÷ {b}", per_round(seconds, a, b))
                    for a, b in RATIOS
                ]
                steps = {way: len(batches[cut]) for way, (cut, _) in WAYS.items()}
                processed = {way: sum(b["input_ids"].numel() for b in batches[cut]) for way, (cut, _) in WAYS.items()}
                timed = (steps, processed, seconds)
                print(
                    f"  {name} mbs {micro_batch_size}: "
                    + ", ".join(f"{statistics.median(seconds[w]):.1f} s {w}" for w in WAYS),
                    file=sys.stderr,
                )
            rows.append((name, micro_batch_size, max_seq_length, measured, timed))
    print_efficiency(rows, args)
    tail = None
    if args.long_factor:
        tail = long_tail(args.time_samples, args.long_factor, args.repeats, torch.get_num_threads())
        rounds = {way: r["rounds"] for way, r in tail.items()}
        spreads += [("long tail, wall time", f"{a} ÷ {b}", per_round(rounds, a, b)) for a, b in RATIOS]
        dataset, lengths, order = long_tail_data(tokenizer, args.time_samples, args.long_factor)
        cut = cut_three_ways(lengths, order, 4, math.ceil(max(lengths) * 1.1))
        attention["long tail", 4] = attention_alone(
            collated(dataset, {"packed": cut["packed"]})["packed"], args.repeats
        )
    spreads += [
        (f"{name} mbs {size}, attention alone", "dense ÷ segments", per_round(ms, "dense", "segments"))
        for (name, size), ms in attention.items()
    ]
    print_attention(attention, args)
    if tail:
        print_long_tail(tail, args)
    print_spreads(spreads, args)


def print_efficiency(rows, args) -> None:
    print(
        f"\nPadding efficiency (real / processed tokens), Llama 2 SentencePiece tokenizer, Alpaca prompt style,"
        f" max_seq_length = longest + 10%; averaged over {args.epochs} epochs. Wall time: one epoch of the same"
        f" {args.time_samples} samples each way, tiny LoRA GPT (2 layers, n_embd 64, vocab 32000), CPU,"
        f" torch threads: {torch.get_num_threads()}; packed twice, with the dense and the segments attention. Times: the"
        f" median of {args.repeats} rounds; ratios: the median of the per-round ratios (spread at the end).\n"
    )
    print(
        "| data | micro_batch_size | random | grouped | packed | samples per row | micro-batches r / g / p"
        " | processed tokens r / g / p | wall time r / g / p dense / p segments (s) | random ÷ grouped"
        " | random ÷ packed dense | random ÷ packed segments |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, micro_batch_size, max_seq_length, measured, timed in rows:
        shares = f"{measured['random']:.1%} | {measured['grouped']:.1%} | {measured['packed']:.1%}"
        line = f"| {name} | {micro_batch_size} | {shares} | {measured['samples_per_row']:.2f} |"
        if timed is None:
            print(line + " – | – | – | – | – | – |")
            continue
        steps, processed, seconds = timed
        ways = ("random", "grouped", "packed segments")
        ratios = " | ".join(f"{per_round(seconds, 'random', w)['median']:.2f}x" for w in WAYS if w != "random")
        print(
            line + f" {' / '.join(str(steps[w]) for w in ways)} | {' / '.join(str(processed[w]) for w in ways)} |"
            f" {' / '.join(f'{statistics.median(seconds[w]):.1f}' for w in WAYS)} | {ratios} |"
        )


def print_attention(attention: dict, args) -> None:
    print(
        f"\nThe attention product alone over the timed packed micro-batches (forward and backward, 4 heads of 16,"
        f" float32), summed; median of {args.repeats} rounds, ratio: the median of the per-round ratios:\n"
    )
    print("| data | micro_batch_size | dense (ms) | segments (ms) | dense ÷ segments |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for (name, micro_batch_size), ms in attention.items():
        dense, segments = statistics.median(ms["dense"]), statistics.median(ms["segments"])
        ratio = per_round(ms, "dense", "segments")["median"]
        print(f"| {name} | {micro_batch_size} | {dense:.0f} | {segments:.0f} | {ratio:.2f}x |")


def print_long_tail(results: dict[str, dict], args) -> None:
    first = next(iter(results.values()))
    print(
        f"\nLong tail: the {args.time_samples} samples plus one of {first['longest']} tokens ({args.long_factor}x"
        f" the median of {first['median']:g}), max_seq_length {first['max_seq_length']}, micro_batch_size 4; each way"
        " in a process of its own. Peak memory: the process's peak resident set above what it held before the first"
        " step.\n"
    )
    print("| way | micro-batches | processed tokens | wall time (s) | peak memory (MiB) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for way, r in results.items():
        print(f"| {way} | {r['steps']} | {r['processed']:,} | {r['seconds']:.1f} | {r['peak_mib']:.0f} |")


def print_spreads(spreads: list[tuple[str, str, dict]], args) -> None:
    print(
        f"\nEvery ratio round by round ({args.repeats} rounds, torch threads: {torch.get_num_threads()}) and its spread;"
        ' "within noise" where the rounds disagree on which way is faster:\n'
    )
    print("| measured | ratio | each round | min | median | max | verdict |")
    print("| --- | --- | --- | ---: | ---: | ---: | --- |")
    for what, ratio, s in spreads:
        rounds = " / ".join(f"{r:.2f}" for r in s["rounds"])
        print(
            f"| {what} | {ratio} | {rounds} | {s['min']:.2f}x | {s['median']:.2f}x | {s['max']:.2f}x | {s['verdict']} |"
        )


if __name__ == "__main__":
    main()
