"""The micro-batch size that fits, found by the rehearsal before the first step.

The rehearsal runs the worst batches (the longest train micro-batch, forward and backward, with the optimizer's state
allocated as a real step has it; then the longest val micro-batch) at the user's --train.micro_batch_size. When they
run out of memory, or on CUDA leave less than --seq.memory_margin of the device free, smaller sizes are tried: only
those that divide the samples of a step, so that --train.global_batch_size and every step's samples stay the same
(more accumulation). A run that fits at the user's size is unchanged: every try is undone.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager

import torch
import torch.distributed

from litgpt_seqlen import ranks
from litgpt_seqlen.data import truncation
from litgpt_seqlen.errors import UserInputError
from litgpt_seqlen.memory import limits
from litgpt_seqlen.memory.sizes import largest_that_fits, micro_batch_sizes
from litgpt_seqlen.training import rehearsal

GiB = 2**30


@dataclasses.dataclass
class Fitted:
    """The search's outcome: the size to train with, the rehearsal at that size, and the report's ``memory`` part."""

    micro_batch_size: int
    rehearsal: dict
    report: dict


def rehearse_run(fabric, state: dict, loaders: dict, plan, train, seq) -> Fitted:
    """The rehearsal of a run (--seq.rehearse) at the size of ``train.micro_batch_size``; with --seq.fit_micro_batch
    (``report`` None without it) at the largest size that fits. A resumed run whose micro-batch no longer fits goes on
    at the smaller one, from the same step, saying that its result is no longer bit-identical."""
    model, optimizer = state["model"], state["optimizer"]
    if not seq.fit_micro_batch:
        result = rehearsal.rehearse_worst_case(fabric, model, optimizer, loaders, plan, train)
        return Fitted(train.micro_batch_size, result, None)
    fitted = fit_micro_batch(fabric, model, optimizer, loaders, plan, train, seq)
    was, now = train.micro_batch_size, fitted.micro_batch_size
    if state["step"] > 0 and now != was:  # a step's samples are whole micro-batches at either size
        state["position"], state["iteration"] = state["position"] * was // now, state["iteration"] * was // now
        fabric.print(
            f"The checkpoint trained with micro-batch {was}, which does not fit here: going on with {now} from step"
            f" {state['step']}. Every step holds the same samples, but the result is not bit-identical to an"
            " uninterrupted run (float rounding; with batch weighting, how micro-batch means weigh)."
        )
    state["micro_batch_size"] = now
    return fitted


def fit_micro_batch(fabric, model, optimizer, loaders: dict, plan, train, seq) -> Fitted:
    """The largest micro-batch size up to ``train.micro_batch_size`` whose steps hold the same samples
    (``micro_batch_sizes``) and whose worst batches fit; every rank ends with the same size. None fits: a
    UserInputError naming what would."""
    upper, batch_size = train.micro_batch_size, train.global_batch_size // fabric.world_size
    sizes = micro_batch_sizes(batch_size, upper)
    total = limits.device_total(fabric.device)
    tried: dict[int, dict] = {}
    passed: dict[int, dict] = {}

    def fits(size: int) -> bool:
        batches = rehearsal.worst_batches(loaders, plan, size)
        outcome, result = _try(fabric, model, optimizer, batches, dataclasses.replace(train, micro_batch_size=size))
        if result is not None and total is not None and result["peak_memory_bytes"] > (1 - seq.memory_margin) * total:
            outcome.update(fits=False, reason=f"leaves less than {seq.memory_margin:.0%} of the device free")
        outcome["fits"] = everyone_agrees(fabric, outcome["fits"])
        tried[size] = outcome
        if outcome["fits"]:
            passed[size] = result
        return outcome["fits"]

    with limits.search_limits(fabric, seq.memory_margin) as cpu_limit, optimizer_state_allocated(fabric, optimizer):
        chosen = largest_that_fits(sizes, fits)
        if chosen is None:
            shorter = _shorter_length_that_fits(fabric, model, optimizer, loaders, plan, train)
            raise UserInputError(no_fit_message(fabric.device, plan, tried[sizes[-1]], shorter, seq.truncate_from))
    report = {
        "device": str(fabric.device),
        "device_memory_bytes": total,
        "cpu_limit_bytes": cpu_limit,
        "margin": seq.memory_margin,
        "tried": [{"micro_batch_size": size, **outcome} for size, outcome in tried.items()],
        "micro_batch_size": chosen,
        "accumulation": batch_size // chosen,
    }
    fabric.print(summary_line(report, upper))
    return Fitted(chosen, passed[chosen], report)


def _try(fabric, model, optimizer, batches: dict, train) -> tuple[dict, dict | None]:
    """One rehearsal: ({"fits", "reason", "peak_memory_bytes"}, the rehearsal's result or None)."""
    try:
        result = rehearsal.rehearse(fabric, model, optimizer, batches, train)
    except rehearsal.OutOfMemory as failed:
        what = "forward and backward" if failed.split == "train" else "forward"
        reason = f"out of memory in the {what} of the longest {failed.split} batch: {failed.detail}"
        return {"fits": False, "reason": reason, "peak_memory_bytes": None}, None
    return {"fits": True, "reason": None, "peak_memory_bytes": result.get("peak_memory_bytes")}, result


def everyone_agrees(fabric, mine: bool) -> bool:
    """True on every rank when true on every rank."""
    if fabric.world_size == 1:
        return mine
    return bool(fabric.all_reduce(torch.tensor([int(mine)], device=fabric.device), reduce_op="min").item())


@contextmanager
def optimizer_state_allocated(fabric, optimizer):
    """The optimizer's state (Adam's two moments, momentum buffers, ...) allocated as after a real step, for as long
    as the search runs, then dropped again, so the first real step starts from a fresh optimizer as without the search.
    It is allocated by one step on zero gradients at learning rate 0, which leaves every weight as it was. A resumed
    run's loaded state is left alone."""
    raw = getattr(optimizer, "optimizer", optimizer)  # past Fabric's wrapper: no loss scaler takes part
    if raw.state:
        yield
        return
    params = [p for group in raw.param_groups for p in group["params"] if p.requires_grad]
    rates = [group["lr"] for group in raw.param_groups]
    problem = None
    try:
        for p in params:
            p.grad = torch.zeros_like(p)
        for group in raw.param_groups:
            group["lr"] = 0.0
        raw.step()
    except Exception as error:
        if not rehearsal.is_out_of_memory(error):
            raise
        problem = UserInputError(
            f"out of memory on {fabric.device} before any batch: the weights with the optimizer's state do not fit"
            f" ({str(error).strip().splitlines()[0][:200]}). A lighter --precision (bf16-true), --quantize bnb.nf4,"
            " a method that trains fewer weights (finetune_lora), or more --devices would."
        )
    finally:
        for group, rate in zip(raw.param_groups, rates):
            group["lr"] = rate
        for p in params:
            p.grad = None
    ranks.agree_on_error(fabric, problem)
    try:
        yield
    finally:
        raw.state.clear()


def _shorter_length_that_fits(fabric, model, optimizer, loaders, plan, train) -> int | None:
    """The longest max_seq_length (in sixteenths of the decided one) at which micro-batch 1 fits: the worst batches
    cut to it, rehearsed as above. None when even the shortest does not fit."""
    worst = rehearsal.worst_batches(loaders, plan, 1)
    one = dataclasses.replace(train, micro_batch_size=1)
    length = plan.decision.max_seq_length
    candidates = sorted({max(1, length * k // 16) for k in range(1, 16)}, reverse=True)

    def fits(limit: int) -> bool:
        batches = {name: cut_batch(batch, limit) for name, batch in worst.items()}
        outcome, _ = _try(fabric, model, optimizer, batches, one)
        return everyone_agrees(fabric, outcome["fits"])

    return largest_that_fits(candidates, fits)


def cut_batch(batch: dict, limit: int) -> dict:
    """``batch`` with every row cut to its first ``limit`` tokens (a packed row's samples cut to what is left)."""
    cut = {
        key: value[:, :limit] if torch.is_tensor(value) and value.dim() == 2 else value for key, value in batch.items()
    }
    if "segment_lengths" in batch:
        cut["segment_lengths"] = [_segments_within(row, limit) for row in batch["segment_lengths"]]
    return cut


def _segments_within(lengths: list[int], limit: int) -> list[int]:
    kept, used = [], 0
    for length in lengths:
        if used >= limit:
            break
        kept.append(min(length, limit - used))
        used += kept[-1]
    return kept


def no_fit_message(device, plan, last: dict, shorter: int | None, truncate_from: str) -> str:
    decision = plan.decision
    lengths = plan.kept_lengths("train")
    longest = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)[:3]
    named = ", ".join(
        f"{lengths[i]} tokens ({plan.where('train', plan.kept['train'][i]) or 'train sample ' + str(plan.kept['train'][i])})"
        for i in longest
    )
    head = (
        f"out of memory on {device} even at --train.micro_batch_size 1 with {decision.summary()}: {last['reason']}."
        f"\nThe longest train samples: {named}."
    )
    if shorter is None:
        return head + (
            "\nNo shorter max_seq_length fits either: the model itself needs more memory than there is. A lighter"
            " --precision (bf16-true), --quantize bnb.nf4, or more --devices would."
        )
    plans = truncation.plan_split(plan.parts["train"], shorter, truncate_from)  # as --seq.over_length truncate cuts
    cut = sum(1 for p in plans if p.truncated)
    responses = sum(parts.response for parts in plan.parts["train"]) or 1
    response_cut = sum(p.response_cut for p in plans) / responses
    return head + (
        f"\nWhat fits, by the same rehearsal: --train.max_seq_length {shorter}, which cuts {cut} of"
        f" {len(plans)} train samples ({cut / len(plans):.1%}) and {response_cut:.1%} of their response tokens (with"
        " --seq.over_length truncate; drop leaves them out; with --seq.pack true the shorter samples still fill whole"
        " rows). Or a lighter --precision (bf16-true), or --quantize bnb.nf4."
    )


def summary_line(report: dict, upper: int) -> str:
    chosen, total = report["micro_batch_size"], report["device_memory_bytes"]
    peak = next(t["peak_memory_bytes"] for t in report["tried"] if t["micro_batch_size"] == chosen)
    room = ""
    if total is not None and peak is not None:
        room = f", peak {peak / GiB:.2f} of {total / GiB:.1f} GiB, keeping {report['margin']:.0%} free"
    if chosen == upper:
        return f"Memory: micro-batch {chosen} fits on {report['device']}{room}."
    return (
        f"Memory: micro-batch {upper} does not fit on {report['device']}; training with micro-batch {chosen} and"
        f" {report['accumulation']} accumulation steps{room}. Every step holds the same samples as at {upper}: with"
        " token weighting the same gradients up to float rounding; with batch weighting each micro-batch's mean"
        " weighs differently. --seq.fit_micro_batch false stops instead."
    )
