"""Validation and the generated example, as upstream runs them, with three differences that keep a run alive and
exact:

- every rank runs every forward: under several devices the model is sharded, so a forward that one rank ran alone
  (upstream generates the example on rank 0 only) would wait for the others for ever;
- the random states are set aside and put back, so no ``--eval.*`` setting changes what training draws (LoRA dropout):
  two runs that differ only in how often they validate train the same weights;
- the val loss is the mean over the supervised tokens of the val samples, each counted once (``val_loss``), so the
  same weights give the same val loss on any number of devices and at any micro-batch size. Upstream averages each
  rank's batch means, counting the samples a rank repeats to even out the shares, and reports rank 0's.
"""

from __future__ import annotations

import math
import random
import time

import torch
from litgpt.args import EvalArgs
from litgpt.finetune.full import generate_example

from litgpt_seqlen.training.rng import preserved_rng

EXAMPLE_SEED = 0  # the same on every rank, so every rank samples the same tokens and runs as many forwards


def generate_everywhere(fabric, model, tokenizer, eval: EvalArgs, data) -> None:
    """litgpt's generated example (printed by rank 0), run on every rank with the same random draws."""
    with preserved_rng():
        random.seed(EXAMPLE_SEED)  # --eval.evaluate_example random picks with it
        torch.manual_seed(EXAMPLE_SEED)
        generate_example(fabric, model, tokenizer, eval, data)


def batch_loss_sums(model, batch: dict, counted_rows: torch.Tensor | None = None) -> torch.Tensor:
    """(the loss summed over the supervised tokens, their count) of one val micro-batch, in float64. The model runs on
    all but the last token, which has nothing to predict: no slice of the logits is copied, so the peak is the logits
    and cross_entropy's own copy (the rehearsal runs this, so it measures what validation needs). ``counted_rows``
    (one bool per row) leaves out rows that weigh nothing."""
    inputs, targets = batch["input_ids"][..., :-1], batch["labels"][..., 1:]
    counted = targets != -100
    if counted_rows is not None:
        counted &= counted_rows.unsqueeze(1)
    if inputs.size(-1) == 0:  # one-token samples only: nothing to predict
        return torch.zeros(2, dtype=torch.float64, device=targets.device)
    logits = model(inputs)
    losses = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), reduction="none"
    ).view_as(targets)
    return torch.stack([(losses * counted).sum().double(), counted.sum().double()])


def val_loss(fabric, model, val_loader, samples: int | None = None) -> torch.Tensor:
    """The mean loss over the supervised tokens of the first ``samples`` val samples (all when None), every sample
    counted once on any number of devices: rank r holds samples r, r + W, r + 2W, ... (the loader's distributed
    sampler, which repeats a few at the end to even out the shares: those weigh nothing), the sums are added over the
    ranks. Every rank runs as many forwards (a sharded model's forward is collective)."""
    world, rank, size = fabric.world_size, fabric.global_rank, val_loader.batch_size
    wanted = len(val_loader.dataset) if samples is None else min(samples, len(val_loader.dataset))
    batches = math.ceil(wanted / (world * size))
    totals = torch.zeros(2, dtype=torch.float64, device=fabric.device)  # loss sum, supervised tokens
    model.eval()
    iterator = iter(val_loader)
    try:
        with torch.no_grad():
            for k in range(batches):
                batch = next(iterator)
                rows = batch["input_ids"].size(0)
                positions = (k * size + torch.arange(rows, device=batch["input_ids"].device)) * world + rank
                totals += batch_loss_sums(model, batch, counted_rows=positions < wanted)
    finally:
        if hasattr(iterator, "close"):  # a loader left part-way: its worker processes end now (see EpochBatches)
            iterator.close()
        del iterator
    model.train()
    if world > 1:
        totals = fabric.all_reduce(totals, reduce_op="sum")
    return (totals[0] / totals[1]).float()


def initial_validation(fabric, model, val_loader, eval: EvalArgs, verify: bool) -> str:
    """Before the first step: the whole val split under --eval.initial_validation, else (when ``verify``) two batches
    as upstream does to check the settings. Returns the loss as the progress lines show it."""
    with preserved_rng():
        if eval.initial_validation:
            fabric.print("Validating ...")
            loss = val_loss(fabric, model, val_loader)
            fabric.print(f"Initial validation | val loss: {loss.item():.4f}")
            return f"{loss.item():.3f}"
        if verify:
            fabric.print("Verifying settings ...")
            val_loss(fabric, model, val_loader, samples=2 * val_loader.batch_size * fabric.world_size)
    return "n/a"


def periodic_validation(fabric, model, val_loader, eval: EvalArgs, tokenizer, data, iteration: int) -> str:
    """Validation during training: the val loss of the first --eval.max_iters micro-batches' worth of val samples
    (what one device sees), printed and logged, and the generated example. Returns the loss as the progress lines
    show it."""
    started = time.perf_counter()
    fabric.print("Validating ...")
    with preserved_rng():
        loss = val_loss(fabric, model, val_loader, samples=eval.max_iters * val_loader.batch_size)
    generate_everywhere(fabric, model, tokenizer, eval, data)
    fabric.print(
        f"iter {iteration}: val loss {loss.item():.4f}, val time: {(time.perf_counter() - started) * 1000:.2f} ms"
    )
    fabric.log_dict({"val_loss": loss, "val_ppl": math.exp(loss)}, step=iteration)
    return f"{loss.item():.3f}"


def final_validation(fabric, model, val_loader, eval: EvalArgs) -> None:
    """After training, under --eval.final_validation: the whole val split, printed and logged as upstream does."""
    if not eval.final_validation:
        return
    fabric.print("Validating ...")
    loss = val_loss(fabric, model, val_loader)
    fabric.log_dict({"val_loss": loss, "val_ppl": math.exp(loss)})
    fabric.print(f"Final evaluation | val loss: {loss.item():.3f} | val ppl: {math.exp(loss):.3f}")
