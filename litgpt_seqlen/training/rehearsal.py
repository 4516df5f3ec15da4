"""--seq.rehearse: run the worst case (the longest micro-batches) before the first step, then undo it.

A length or memory failure then shows in the first minute rather than hours in, when the longest sample first comes
up. The rehearsal trains with ``loss.train_loss`` and validates with ``evaluation.batch_loss_sums``, as the run does.
"""

from __future__ import annotations

import gc
import time

import lightning as L
import torch
from lightning.pytorch.utilities.memory import is_oom_error
from litgpt.args import TrainArgs
from torch.utils.data import DataLoader

import data_utils
from data_utils import Decision
from litgpt_seqlen.data import packing
from litgpt_seqlen.errors import UserInputError
from litgpt_seqlen.training.evaluation import batch_loss_sums
from litgpt_seqlen.training.loss import train_loss
from litgpt_seqlen.training.rng import preserved_rng


def rehearsal_batches(
    loaders: dict[str, DataLoader], lengths: dict[str, list[int]], batch_size: int, max_seq_length: int | None = None
) -> dict[str, dict]:
    """For each loader, its largest micro-batch: the ``batch_size`` longest samples of its dataset (whose sample
    lengths are ``lengths[name]``, in dataset order), or for a packed loader (``max_seq_length`` needed) the
    ``batch_size`` fullest rows; collated with the loader's own collate_fn."""
    batches = {}
    for name, loader in loaders.items():
        if isinstance(loader.dataset, packing.PackedRows):
            items = packing.fullest_rows(lengths[name], max_seq_length, batch_size)
        else:
            items = data_utils.longest_batch(lengths[name], batch_size)
        batches[name] = loader.collate_fn([loader.dataset[i] for i in items])
    return batches


class OutOfMemory(Exception):
    """A rehearsal batch did not fit: ``split`` ("train" or "val"), its ``shape`` and the device's words."""

    def __init__(self, split: str, shape: list[int], detail: str) -> None:
        super().__init__(f"{split} {shape}: {detail}")
        self.split, self.shape, self.detail = split, shape, detail


def is_out_of_memory(error: BaseException) -> bool:
    """torch's CUDA error class, or Lightning's test (CUDA, cuDNN and CPU allocator failures)."""
    return isinstance(error, torch.OutOfMemoryError) or is_oom_error(error)


def worst_batches(loaders: dict[str, DataLoader], plan, micro_batch_size: int) -> dict[str, dict]:
    """The largest micro-batch of ``micro_batch_size`` of each loader (``rehearsal_batches``), from the
    ``LengthPlan``'s kept lengths."""
    lengths = {name: plan.kept_lengths(name) for name in loaders}
    return rehearsal_batches(loaders, lengths, micro_batch_size, plan.decision.max_seq_length)


def rehearse_worst_case(fabric: L.Fabric, model, optimizer, loaders: dict[str, DataLoader], plan, train) -> dict:
    """The rehearsal of a run at the user's micro-batch size (``worst_batches``), run by ``rehearse``; out of memory
    is a UserInputError."""
    try:
        return rehearse(fabric, model, optimizer, worst_batches(loaders, plan, train.micro_batch_size), train)
    except OutOfMemory as failed:
        message = out_of_memory_message(fabric.device, failed.split, failed.shape, plan.decision)
    raise UserInputError(message)


def rehearse(fabric: L.Fabric, model, optimizer, batches: dict[str, dict], train: TrainArgs) -> dict:
    """One forward + backward on ``batches["train"]`` and one validation batch on ``batches["val"]``, as fit and
    validate run them. Then it is undone: gradients dropped (as a fresh optimizer has them), no optimizer step, the RNG
    states put back, the model in train mode. Returns what it measured; out of memory raises ``OutOfMemory``, with
    what the failed try held freed."""
    shapes = {name: list(batch["input_ids"].shape) for name, batch in batches.items()}
    shown = ", ".join(f"{name} {shape[0]} × {shape[1]}" for name, shape in shapes.items())
    fabric.print(f"Rehearsing the longest micro-batches ({shown} tokens) ...")
    cuda = fabric.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(fabric.device)
        torch.cuda.reset_peak_memory_stats(fabric.device)
        allocated_before = torch.cuda.memory_allocated(fabric.device)
    started = time.perf_counter()
    running, detail, loss = "train", None, None
    try:
        with preserved_rng():
            model.train()
            loss = train_loss(model, fabric.to_device(batches["train"]))
            fabric.backward(loss / train.gradient_accumulation_iters(fabric.world_size, 1))
            del loss
            optimizer.zero_grad(set_to_none=True)
            running = "val"
            model.eval()
            with torch.no_grad():
                batch_loss_sums(model, fabric.to_device(batches["val"]))
            if cuda:
                torch.cuda.synchronize(fabric.device)
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        detail = str(error).strip().splitlines()[0][:300]
    finally:
        model.train()
    if detail is not None:  # out of the except block, so its traceback (and the tensors its frames hold) is gone
        loss = None
        optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
        raise OutOfMemory(running, shapes[running], detail)
    result = {
        "train_batch": shapes["train"],
        "val_batch": shapes["val"],
        "seconds": round(time.perf_counter() - started, 3),
        "device": str(fabric.device),
    }
    if cuda:
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(fabric.device)
        result["memory_before_bytes"] = allocated_before  # weights and whatever else: peak - this = the batches' share
        result["device_memory_bytes"] = torch.cuda.get_device_properties(fabric.device).total_memory
    peak = f", peak memory {result['peak_memory_bytes'] / 2**30:.2f} GiB" if cuda else ""
    fabric.print(f"Rehearsal passed in {result['seconds']:.2f} s{peak}.")
    return result


def out_of_memory_message(device: torch.device, split: str, shape: list[int], decision: Decision) -> str:
    memory = ""
    if device.type == "cuda":
        try:
            free, total = torch.cuda.mem_get_info(device)
            name = torch.cuda.get_device_properties(device).name
            memory = f" ({name}, {total / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free now)"
        except Exception:  # what memory there is, is a detail; the message matters
            pass
    what = "forward and backward pass on the longest train" if split == "train" else "forward pass on the longest val"
    return (
        f"out of memory on {device}{memory} in the rehearsal: a {what} micro-batch, {shape[0]} × {shape[1]} tokens"
        f" ({decision.summary()}). {'Training' if split == 'train' else 'Validation'} meets this shape whenever the longest"
        " sample comes up, so the run would fail there later.\n"
        "To make it fit: a smaller --train.micro_batch_size (keep --train.global_batch_size: more accumulation steps),"
        " a lower --train.max_seq_length with --seq.over_length truncate or drop, a lighter --precision"
        " (bf16-true, 16-true), or --quantize bnb.nf4 (bitsandbytes)."
    )
