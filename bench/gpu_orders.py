"""The three train orders side by side: random, grouped (--seq.group_by_length) and packed (--seq.pack), each trained
through the real command line (finetune_lora.py, LoRA) for one epoch of the same long-tailed synthetic data set, on a
random-weight model built here. Tokens per second come from what each run writes: the closing performance report it
prints (training time, litgpt's Tok/sec over padded tokens, peak memory on CUDA) and the exact token counts of
``seq_lengths.json`` (``batches``), so the process's start, data scan, weight loading and final save are not timed.

Used by ``bench/gpu_check.py``; the tokenizer and the data of exact lengths come from ``tests/assets.py``.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "tests") not in sys.path:
    sys.path.insert(0, str(ROOT / "tests"))

import assets  # noqa: E402  (tests/assets.py: the word-level tokenizer and data of exact token lengths)

# The flags that select each train order (litgpt_seqlen/args.py: SeqArgs.order).
ORDERS = {
    "random": [],
    "grouped": ["--seq.group_by_length", "true"],
    "packed": ["--seq.pack", "true"],
}
SHORTEST = 64  # above the longest Alpaca prompt (54 tokens with an input) that tests/assets.py writes


@dataclass(frozen=True)
class Setup:
    """What the check trains: the model's shape, the data set and the batch sizes."""

    name: str
    n_layer: int
    n_embd: int
    n_head: int
    intermediate_size: int
    padded_vocab_size: int | None  # None: the tokenizer's vocabulary
    block_size: int
    train_samples: int
    longest: int
    val_samples: int
    micro_batch_size: int
    global_batch_size: int
    num_workers: int


# Llama-like, about 0.95B parameters (of which 131M the 32,000-row embedding and head): a real model's shape and a real
# vocabulary's logits, though the word-level tokenizer uses only its first rows.
FULL = Setup(
    name="gpu-check-1b",
    n_layer=16,
    n_embd=2048,
    n_head=16,
    intermediate_size=5632,
    padded_vocab_size=32000,
    block_size=2048,
    train_samples=1024,
    longest=1800,
    val_samples=8,
    micro_batch_size=4,
    global_batch_size=16,
    num_workers=4,
)
# The same code path in seconds, on a CPU too (--tiny).
TINY = Setup(
    name="gpu-check-tiny",
    n_layer=2,
    n_embd=32,
    n_head=2,
    intermediate_size=64,
    padded_vocab_size=None,
    block_size=2048,
    train_samples=48,
    longest=400,
    val_samples=4,
    micro_batch_size=2,
    global_batch_size=4,
    num_workers=0,
)


def model_config(setup: Setup, vocab_size: int):
    from litgpt import Config

    return Config(
        name=setup.name,
        block_size=setup.block_size,
        vocab_size=vocab_size,
        padded_vocab_size=setup.padded_vocab_size or vocab_size,
        n_layer=setup.n_layer,
        n_head=setup.n_head,
        n_embd=setup.n_embd,
        rotary_percentage=1.0,
        parallel_residual=False,
        bias=False,
        norm_class_name="RMSNorm",
        mlp_class_name="LLaMAMLP",
        intermediate_size=setup.intermediate_size,
    )


def build_checkpoint(directory: Path, setup: Setup, device: str, seed: int = 0) -> dict:
    """The tokenizer, model_config.yaml and a random-weight lit_model.pth in ``directory`` (the weights made on
    ``device``, in bfloat16 on CUDA, saved from the CPU); returns the model's figures."""
    import torch
    from litgpt import GPT
    from litgpt.utils import save_config

    started = time.perf_counter()
    assets.build_tokenizer(directory)
    vocab_size = len(json.loads((directory / "tokenizer.json").read_text())["model"]["vocab"])
    config = model_config(setup, vocab_size)
    save_config(config, directory)
    torch.manual_seed(seed)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = GPT(config).to(dtype)
    parameters = sum(p.numel() for p in model.parameters())
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, directory / "lit_model.pth")
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return {
        **{k: v for k, v in asdict(setup).items() if k in ("name", "n_layer", "n_embd", "n_head", "block_size")},
        "intermediate_size": setup.intermediate_size,
        "vocab_size": vocab_size,
        "padded_vocab_size": config.padded_vocab_size,
        "parameters": parameters,
        "dtype": str(dtype).removeprefix("torch."),
        "file_bytes": (directory / "lit_model.pth").stat().st_size,
        "seconds": round(time.perf_counter() - started, 2),
    }


def long_tailed_lengths(count: int, longest: int, seed: int = 0) -> list[int]:
    """``count`` lengths, log-normal around a tenth of ``longest`` (most samples short, a few long), the last one
    exactly ``longest``; each at least ``SHORTEST``."""
    rng = random.Random(seed)
    median = max(SHORTEST, longest // 10)
    drawn = [round(rng.lognormvariate(math.log(median), 0.8)) for _ in range(count - 1)]
    return [min(longest, max(SHORTEST, n)) for n in drawn] + [longest]


def build_data(directory: Path, tokenizer_dir: Path, setup: Setup) -> dict:
    """train.json and val.json of exact token lengths; returns their length figures."""
    train = long_tailed_lengths(setup.train_samples, setup.longest)
    val = long_tailed_lengths(setup.val_samples, setup.longest // 4, seed=1)
    assets.build_data(directory, tokenizer_dir, train, val)
    ordered = sorted(train)
    return {
        "train_samples": len(train),
        "val_samples": len(val),
        "train_tokens": sum(train),
        "train_median": statistics.median(train),
        "train_p90": ordered[math.ceil(0.9 * len(ordered)) - 1],
        "train_max": max(train),
    }


def run_command(order: str, checkpoint: Path, data: Path, out_dir: Path, setup: Setup, precision: str) -> list[str]:
    """One epoch of LoRA fine-tuning in ``order``: no validation during training, no step checkpoints."""
    return [
        sys.executable,
        str(ROOT / "finetune_lora.py"),
        str(checkpoint),
        *("--data", "JSON", "--data.json_path", str(data), "--data.num_workers", str(setup.num_workers)),
        *("--out_dir", str(out_dir), "--precision", precision, "--devices", "1"),
        *("--train.epochs", "1", "--train.lr_warmup_steps", "1", "--train.save_interval", "100000"),
        *("--train.global_batch_size", str(setup.global_batch_size)),
        *("--train.micro_batch_size", str(setup.micro_batch_size)),
        *("--eval.interval", "100000", "--eval.final_validation", "false", "--eval.max_new_tokens", "4"),
        *ORDERS[order],
    ]


PERFORMANCE = {  # litgpt's closing performance report, as the run prints it
    "train_seconds": r"Training Time\s*:\s*([\d.]+) s",
    "padded_tokens_per_second": r"Tok/sec\s*:\s*([\d.]+) tok/s",
    "memory_used_gb": r"Memory Used\s*:\s*([\d.]+) GB",
}


def read_run(stdout: str, out_dir: Path) -> dict:
    """The run's figures from its performance report and its seq_lengths.json; raises if either is missing. Rates
    come from litgpt's Tok/sec (padded tokens over the exact training time) and the exact token counts."""
    found = {key: float(m.group(1)) for key, pattern in PERFORMANCE.items() if (m := re.search(pattern, stdout))}
    if "padded_tokens_per_second" not in found:
        raise RuntimeError("the run printed no performance report (Tok/sec)")
    report = json.loads((out_dir / "seq_lengths.json").read_text())
    batches, rehearsal = report["batches"], report.get("rehearsal", {})
    per_padded_token = found["padded_tokens_per_second"] / batches["padded_tokens"]  # 1 / training seconds
    return {
        **found,
        "max_seq_length": report["max_seq_length"],
        "micro_batches": batches["count"],
        "samples": batches["samples"],
        "rows": batches["rows"],
        "real_tokens": batches["real_tokens"],
        "padded_tokens": batches["padded_tokens"],
        "efficiency": batches["efficiency"],
        "attention": batches["attention"],
        "real_tokens_per_second": round(batches["real_tokens"] * per_padded_token, 1),
        "samples_per_second": round(batches["samples"] * per_padded_token, 2),
        "rehearsal_peak_memory_bytes": rehearsal.get("peak_memory_bytes"),
    }


def run_order(command: list[str], out_dir: Path, timeout: float, env: dict) -> dict:
    """One order's run, in a process of its own; a failure is recorded with the tail of its output."""
    started = time.perf_counter()
    try:
        ran = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    except subprocess.TimeoutExpired as expired:
        output = (expired.stdout or b"")[-3000:]
        output = output.decode(errors="replace") if isinstance(output, bytes) else output
        return {"status": "error", "error": f"timed out after {timeout:.0f} s", "output_tail": output}
    wall = round(time.perf_counter() - started, 2)
    if ran.returncode != 0:
        tail = (ran.stdout + ran.stderr)[-3000:]
        return {"status": "error", "error": f"exit {ran.returncode}", "output_tail": tail, "wall_seconds": wall}
    try:
        return {"status": "ok", **read_run(ran.stdout, out_dir), "wall_seconds": wall}
    except Exception as failed:  # recorded: the other orders still run
        return {"status": "error", "error": repr(failed), "output_tail": ran.stdout[-3000:], "wall_seconds": wall}


def compare_orders(work: Path, tiny: bool, cuda: bool, deadline: float) -> dict:
    """Builds the model and the data in ``work``, trains each order in turn, and returns every figure, with each
    order's real tokens per second over random's. ``deadline``: a ``time.monotonic()`` no run may outlast."""
    setup = TINY if tiny else FULL
    checkpoint, data = work / "checkpoint", work / "data"
    result = {"model": build_checkpoint(checkpoint, setup, "cuda" if cuda else "cpu")}
    result["data"] = build_data(data, checkpoint, setup)
    precision = "bf16-true" if cuda else "32-true"
    result["settings"] = {
        "precision": precision,
        "micro_batch_size": setup.micro_batch_size,
        "global_batch_size": setup.global_batch_size,
        "epochs": 1,
        "method": "lora (litgpt's defaults: r 8, query and value)",
    }
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""
    runs = result["runs"] = {}
    for order in ORDERS:
        left = deadline - time.monotonic()
        if left < 10:
            runs[order] = {"status": "error", "error": "not run: the check's time was spent"}
            continue
        out_dir = work / f"out_{order}"
        command = run_command(order, checkpoint, data, out_dir, setup, precision)
        runs[order] = run_order(command, out_dir, left, env)
    result["real_tokens_per_second_over_random"] = speedups(runs)
    result["status"] = "ok" if all(r["status"] == "ok" for r in runs.values()) else "failed"
    return result


def speedups(runs: dict) -> dict:
    base = runs.get("random", {}).get("real_tokens_per_second")
    return {
        order: round(run["real_tokens_per_second"] / base, 3)
        for order, run in runs.items()
        if base and run.get("real_tokens_per_second")
    }
