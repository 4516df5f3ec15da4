"""Random states: captured for a checkpoint, and set aside around work that must not change what training draws."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def capture_rng() -> dict:
    """The python, numpy, torch CPU and (when initialized) this rank's CUDA random states, as plain values and
    tensors (what ``torch.load(weights_only=True)`` reads back)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # this rank's device only: no context on the others
        state["cuda"] = torch.cuda.get_rng_state(torch.cuda.current_device())
    return state


def restore_rng(state: dict) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["position"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"], torch.cuda.current_device())


@contextlib.contextmanager
def preserved_rng():
    """Whatever runs inside draws from the random states as it likes; they are put back afterwards, so training draws
    the same numbers as if it had not run."""
    state = capture_rng()
    try:
        yield
    finally:
        restore_rng(state)
