"""What the loop counts and prints: token counts per micro-batch and upstream's progress line and metrics."""

from __future__ import annotations

import time

from litgpt import utils as litgpt_utils


def count_tokens(counts: dict, batch: dict) -> None:
    """Adds a micro-batch to this rank's token counts (on the device: no wait for it)."""
    counts["raw_tokens"] += batch["token_counts"]["raw"].sum()
    counts["raw_tokens_plus_prompt_template"] += batch["token_counts"]["raw_plus_prompt_template"].sum()
    counts["raw_tokens_plus_prompt_template_and_padding"] += batch["input_ids"].numel()
    counts["rows"] += batch["input_ids"].size(0)
    counts["samples"] += batch["token_counts"]["raw"].numel()


def log_progress(fabric, state, epoch, iteration_started, started, throughput, val_loss, accumulating) -> None:
    """The progress line and the logged metrics, as upstream prints and logs them."""
    now, iteration, counts = time.perf_counter(), state["iteration"], state["token_counts"]
    throughput.update(
        time=now - started,
        batches=iteration,
        samples=counts["samples"].item(),
        lengths=counts["raw_tokens_plus_prompt_template_and_padding"].item(),
    )
    throughput.compute_and_log(step=iteration)
    metrics = {
        "loss": state["running_loss"].compute().item(),
        "iter": iteration,
        "step": state["step"],
        "epoch": epoch,
        "iter_time": now - iteration_started,
        "tokens": counts["raw_tokens_plus_prompt_template"],
        "total_tokens": counts["raw_tokens_plus_prompt_template"] * fabric.world_size,
        "learning_rate": state["scheduler"].get_last_lr()[0],
    }
    fabric.print(
        f"Epoch {epoch + 1} | iter {iteration} step {state['step']} | loss train: {metrics['loss']:.3f},"
        f" val: {val_loss} | iter time: {metrics['iter_time'] * 1000:.2f} ms{'' if accumulating else ' (step)'}"
    )
    fabric.log_dict(metrics, step=iteration)


def performance_report(fabric, counts: dict, started: float) -> dict:
    """Upstream's closing report (tokens, time, memory), over all ranks; returns the summed counts."""
    counts = {key: fabric.all_reduce(value, reduce_op="sum").item() for key, value in counts.items()}
    elapsed = time.perf_counter() - started
    fabric.print(litgpt_utils.create_finetuning_performance_report(elapsed, counts, fabric.device.type))
    return counts
