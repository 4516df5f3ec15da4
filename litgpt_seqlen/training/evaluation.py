"""Validation and the generated example, as upstream runs them, with two differences that keep a run alive and exact:

- every rank runs every forward: under several devices the model is sharded, so a forward that one rank ran alone
  (upstream generates the example on rank 0 only) would wait for the others for ever;
- the random states are set aside and put back, so no ``--eval.*`` setting changes what training draws (LoRA dropout):
  two runs that differ only in how often they validate train the same weights.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time

import torch
from litgpt.args import EvalArgs
from litgpt.finetune.full import generate_example, validate

from litgpt_seqlen.training.rng import preserved_rng

EXAMPLE_SEED = 0  # the same on every rank, so every rank samples the same tokens and runs as many forwards


def generate_everywhere(fabric, model, tokenizer, eval: EvalArgs, data) -> None:
    """litgpt's generated example (printed by rank 0), run on every rank with the same random draws."""
    with preserved_rng():
        random.seed(EXAMPLE_SEED)  # --eval.evaluate_example random picks with it
        torch.manual_seed(EXAMPLE_SEED)
        generate_example(fabric, model, tokenizer, eval, data)


def initial_validation(fabric, model, val_loader, eval: EvalArgs, verify: bool) -> str:
    """Before the first step: the whole val split under --eval.initial_validation, else (when ``verify``) two batches
    as upstream does to check the settings. Returns the loss as the progress lines show it."""
    with preserved_rng():
        if eval.initial_validation:
            return f"{validate(fabric, model, val_loader, dataclasses.replace(eval, max_iters=len(val_loader))):.3f}"
        if verify:
            fabric.print("Verifying settings ...")
            validate(fabric, model, val_loader, dataclasses.replace(eval, max_iters=2), verbose=False)
    return "n/a"


def periodic_validation(fabric, model, val_loader, eval: EvalArgs, tokenizer, data, iteration: int) -> str:
    """Validation during training: the val loss averaged over the ranks, printed and logged, and the generated example.
    Returns the loss as the progress lines show it."""
    started = time.perf_counter()
    with preserved_rng():
        rank_loss = validate(fabric, model, val_loader, eval)
    generate_everywhere(fabric, model, tokenizer, eval, data)
    loss = fabric.all_reduce(rank_loss.to(fabric.device), reduce_op="mean")  # a collective: every rank waits here
    fabric.print(
        f"iter {iteration}: val loss {loss.item():.4f}, val time: {(time.perf_counter() - started) * 1000:.2f} ms"
    )
    fabric.log_dict({"val_loss": loss, "val_ppl": math.exp(loss)}, step=iteration)
    return f"{loss.item():.3f}"


def final_validation(fabric, model, val_loader, eval: EvalArgs) -> None:
    """After training, under --eval.final_validation: the whole val split, printed and logged as upstream does."""
    if not eval.final_validation:
        return
    val_loss = validate(fabric, model, val_loader, dataclasses.replace(eval, max_iters=len(val_loader)))
    fabric.log_dict({"val_loss": val_loss, "val_ppl": math.exp(val_loss)})
    fabric.print(f"Final evaluation | val loss: {val_loss.item():.3f} | val ppl: {math.exp(val_loss):.3f}")
