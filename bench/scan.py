"""The length scan against litgpt's own, side by side in one process, on ../shared data replicated to 50k samples.

    .venv/bin/python bench/scan.py [--samples 50000] [--repeats 3]

For each real tokenizer in ../shared/tokenizers: samples/second of
  - litgpt:  ``get_longest_seq_length(ConcatDataset([train, val]))`` from ``litgpt.finetune.lora``
  - project: ``scan.scan_parts`` over train and val (as ``scan.scan_split`` calls it), 1 and 2 workers
on the very same ``SFTDataset`` objects. Runs are interleaved and the best of ``--repeats`` is kept, since other
processes on the machine add noise. Then the scan's memory, and what keeping the scan's token ids for training would
save and cost. Exits non-zero only when a result differs (never on a timing).
"""

import argparse
import gc
import json
import os
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
from litgpt.data import SFTDataset
from litgpt.finetune.lora import get_longest_seq_length
from litgpt.tokenizer import Tokenizer
from torch.utils.data import ConcatDataset

from litgpt_seqlen.data.scan import scan_parts

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
TOKENIZERS = ("llama2-hf", "llama2-sentencepiece")
VAL_FRACTION = 0.05


def load_samples(count: int) -> list[dict]:
    """en + zh demo data, repeated in order until there are ``count`` samples."""
    base = []
    for name in ("alpaca_en_demo.json", "alpaca_zh_demo.json"):
        base += json.loads((SHARED / "data" / name).read_text(encoding="utf-8"))
    return [base[i % len(base)] for i in range(count)]


def timed(function):
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def project_scan(train, val, workers: int) -> list[int]:
    parts = scan_parts(train, "train", workers=workers) + scan_parts(val, "val", workers=workers)
    return [p.length for p in parts]


def rss_peak_kib() -> int | None:
    try:
        return int(
            next(
                line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM")
            ).split()[1]
        )
    except (OSError, StopIteration):
        return None


def reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def scan_memory(train, val) -> tuple[float, float | None]:
    """(tracemalloc peak of the Python heap, rise of the process's peak RSS), in MiB, during a 1-worker scan."""
    gc.collect()
    rss_before = rss_peak_kib() if reset_rss_peak() else None
    tracemalloc.start()
    project_scan(train, val, workers=1)
    _, heap_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_rise = (rss_peak_kib() - rss_before) / 1024 if rss_before is not None else None
    return heap_peak / 2**20, rss_rise


def epoch_of_items(dataset) -> tuple[float, list[int], int]:
    """Seconds to tokenize one epoch through ``dataset[i]`` (what a DataLoader does), the lengths, and the bytes to keep
    every sample's input_ids as int32 (one flat array plus int64 offsets: the least any reuse could keep)."""
    seconds, items = timed(lambda: [dataset[i]["input_ids"] for i in range(len(dataset))])
    lengths = [len(ids) for ids in items]
    flat = np.concatenate([ids.numpy().astype(np.int32) for ids in items])
    offsets = np.cumsum([0] + lengths, dtype=np.int64)
    return seconds, lengths, flat.nbytes + offsets.nbytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=50_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if not ((SHARED / "data").is_dir() and (SHARED / "tokenizers").is_dir()):
        print(
            f"skipped: this bench reads {SHARED}/data and {SHARED}/tokenizers, the project's shared assets beside the clone"
        )
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    samples = load_samples(args.samples)
    cut = len(samples) - int(len(samples) * VAL_FRACTION)
    print(
        f"{len(samples)} samples (../shared en + zh, repeated), train {cut} / val {len(samples) - cut}, prompt style alpaca;"
        f" {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; best of {args.repeats} interleaved runs\n"
    )
    scan_rows, reuse_rows, mismatches = [], [], []
    for name in TOKENIZERS:
        tokenizer = Tokenizer(SHARED / "tokenizers" / name)
        train = SFTDataset(samples[:cut], tokenizer, prompt_style="alpaca")
        val = SFTDataset(samples[cut:], tokenizer, prompt_style="alpaca")
        both = ConcatDataset([train, val])

        best = {"litgpt": float("inf"), 1: float("inf"), 2: float("inf")}
        results = {}
        for _ in range(args.repeats):
            seconds, results["litgpt"] = timed(lambda: get_longest_seq_length(both))
            best["litgpt"] = min(best["litgpt"], seconds)
            for workers in (1, 2):
                seconds, results[workers] = timed(lambda: project_scan(train, val, workers))
                best[workers] = min(best[workers], seconds)
        heap_mib, rss_mib = scan_memory(train, val)
        epoch_seconds, item_lengths, kept_bytes = epoch_of_items(both)

        longest, longest_index = results["litgpt"]
        mismatches_before = len(mismatches)
        for workers in (1, 2):
            ours = results[workers]
            if ours != item_lengths:
                wrong = (
                    next(i for i, (a, b) in enumerate(zip(ours, item_lengths)) if a != b)
                    if len(ours) == len(item_lengths)
                    else "count"
                )
                mismatches.append(
                    f"{name}, {workers} worker(s): per-sample lengths differ from len(dataset[i]['input_ids']) (first at {wrong})"
                )
            if (max(ours), ours.index(max(ours))) != (longest, longest_index):
                mismatches.append(
                    f"{name}, {workers} worker(s): longest {max(ours)} at {ours.index(max(ours))}, litgpt {longest} at {longest_index}"
                )

        rate = {key: len(both) / seconds for key, seconds in best.items()}
        scan_rows.append(
            f"| {name} | {len(both):,} | {rate['litgpt']:,.0f} | {rate[1]:,.0f} | {rate[1] / rate['litgpt']:.2f}x"
            f" | {rate[2]:,.0f} | {rate[2] / rate['litgpt']:.2f}x | {longest} / {max(results[2])}"
            f" | {'yes' if len(mismatches) == mismatches_before else 'NO'} | {heap_mib:.1f} | {'n/a' if rss_mib is None else f'{rss_mib:.1f}'} |"
        )
        tokens = sum(item_lengths)
        reuse_rows.append(
            f"| {name} | {epoch_seconds:.1f} | {epoch_seconds / len(both) * 1e6:.0f} | {tokens:,} | {kept_bytes / 2**20:.1f}"
            f" | {kept_bytes / len(both) * 1e6 / 2**20:,.0f} |"
        )
        print(
            f"{name}: done ({best['litgpt']:.1f} s litgpt, {best[1]:.1f} s / {best[2]:.1f} s project with 1 / 2 workers)",
            flush=True,
        )

    print("\n### Scan: samples/second, best of", args.repeats, "\n")
    print(
        "| tokenizer | samples | litgpt `get_longest_seq_length` | project, 1 worker | ratio | project, 2 workers | ratio"
        " | longest (litgpt / project) | per-sample lengths equal | scan heap peak MiB (tracemalloc, 1 worker) | scan RSS peak rise MiB (VmHWM, 1 worker) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    print("\n".join(scan_rows))
    print("\n### Reuse: what keeping the scan's token ids for training would save and cost\n")
    print(
        "| tokenizer | one epoch of `dataset[i]`, 1 process (s) | µs per sample | tokens | ids kept as int32 + offsets (MiB) | same per 1M samples (MiB) |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    print("\n".join(reuse_rows))
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")
    for line in mismatches:
        print(f"MISMATCH: {line}", file=sys.stderr)
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
