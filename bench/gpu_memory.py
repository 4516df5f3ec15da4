"""The memory search under a real CUDA memory cap, for ``bench/gpu_check.py``.

A small GPT whose output layer is wide (the logits dominate a micro-batch's memory) trains on long samples twice:
first with no cap, at micro-batch 8, which gives the rehearsal's peak at 8; then with the process capped by
``torch.cuda.set_per_process_memory_fraction`` at 60% of that peak, so 8 cannot fit and a smaller size must be chosen.
Both runs go through ``finetune_lora.py``; the figures come from their ``seq_lengths.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import assets  # noqa: E402  (tests/assets.py: the word-level tokenizer and data of exact token lengths)

# Caps this process's CUDA memory at CUDA_FRACTION of the device, then runs the command line.
CAPPED_RUN = """
import os, sys
import torch
sys.path.insert(0, os.environ["PROJECT_ROOT"])
if "CUDA_FRACTION" in os.environ:
    torch.cuda.set_per_process_memory_fraction(float(os.environ["CUDA_FRACTION"]), 0)
import finetune_lora
finetune_lora.cli()
"""


def build(work: Path, cuda: bool) -> tuple[Path, Path]:
    """(checkpoint, data) in ``work``: 4 layers, n_embd 256, 65,536 padded vocabulary; 32 samples of 1,500-1,900
    tokens. Without CUDA (the code path only): 2 layers, n_embd 32, 4,096, and samples of 150-190 tokens."""
    checkpoint, data = work / "checkpoint", work / "data"
    checkpoint.mkdir(parents=True, exist_ok=True)
    assets.build_tokenizer(checkpoint)
    wide = {"n_layer": 4, "n_head": 4, "n_embd": 256, "padded_vocab_size": 65_536}
    assets.build_checkpoint(checkpoint, block_size=2048, **(wide if cuda else {"padded_vocab_size": 4_096}))
    train = [1500 + 13 * i for i in range(32)] if cuda else [150 + i for i in range(0, 40, 2)]
    assets.build_data(data, checkpoint, train, train[-8:])
    return checkpoint, data


def run(work: Path, checkpoint: Path, data: Path, name: str, precision: str, fraction: float | None) -> dict:
    out_dir = work / name
    script = work / "capped_run.py"
    script.write_text(CAPPED_RUN)
    env = dict(os.environ, PYTHONWARNINGS="ignore", PROJECT_ROOT=str(ROOT))
    if fraction is not None:
        env["CUDA_FRACTION"] = str(fraction)
    command = [
        sys.executable,
        str(script),
        str(checkpoint),
        *("--data", "JSON", "--data.json_path", str(data), "--data.num_workers", "0", "--out_dir", str(out_dir)),
        *("--precision", precision, "--train.micro_batch_size", "8", "--train.global_batch_size", "16"),
        *("--train.max_steps", "2", "--train.lr_warmup_steps", "1", "--eval.interval", "1000"),
        *("--eval.max_new_tokens", "2", "--eval.max_iters", "1", "--seq.loss_weighting", "token"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=240)
    result = {"returncode": done.returncode, "fraction": fraction}
    memory_lines = [line for line in done.stdout.splitlines() if line.startswith("Memory:")]
    result["printed"] = memory_lines[-1] if memory_lines else None
    report = out_dir / "seq_lengths.json"
    if report.exists():
        result["memory"] = json.loads(report.read_text()).get("memory")
    if done.returncode != 0:
        result["stderr_tail"] = done.stderr[-2000:]
    return result


def memory_search(work: Path, cuda: bool) -> dict:
    """Both runs; ok when the uncapped run fits at 8 and the capped one trains at a smaller size."""
    import torch

    precision = "bf16-true" if cuda else "32-true"
    checkpoint, data = build(work, cuda)
    free = run(work, checkpoint, data, "uncapped", precision, None)
    outcome = {"uncapped": free}
    peak = ((free.get("memory") or {}).get("tried") or [{}])[0].get("peak_memory_bytes")
    if not cuda or free["returncode"] != 0 or not peak:
        outcome["status"] = "ok" if free["returncode"] == 0 and not cuda else "failed"
        return outcome
    total = torch.cuda.get_device_properties(0).total_memory
    capped = run(work, checkpoint, data, "capped", precision, round(0.6 * peak / total, 4))
    chosen = (capped.get("memory") or {}).get("micro_batch_size")
    outcome.update(capped=capped, peak_at_8_bytes=peak, device_total_bytes=total)
    outcome["status"] = "ok" if capped["returncode"] == 0 and chosen is not None and chosen < 8 else "failed"
    return outcome
