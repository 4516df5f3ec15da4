"""The flags this entry point adds to litgpt finetune_lora's: the ``--seq.*`` group and ``--resume``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal


@dataclass
class SeqArgs:
    """Sequence-length arguments (new in this entry point)"""

    headroom: float = 0.1
    """Margin above the longest sample when max_seq_length is sized from the data: 0.1 adds 10%. Capped at block_size.
    Ignored when --train.max_seq_length is set."""
    over_length: Literal["truncate", "drop", "error"] = "truncate"
    """What happens to samples longer than max_seq_length: cut them, leave them out (each written with its file and
    position to OUT_DIR/dropped_samples.jsonl), or stop before the model is built, naming them."""
    truncate_from: Literal["prompt", "end"] = "prompt"
    """How truncate cuts a sample: `prompt` cuts the middle of the user's text (instruction/input) first, keeping the
    prompt template, its response marker and the whole response with its EOS whenever they fit; `end` keeps the first
    max_seq_length tokens, as litgpt does. Either way a sample left with no token to learn from is dropped (kept in
    OUT_DIR/dropped_samples.jsonl)."""
    dry_run: bool = False
    """Scan, decide and report, then exit: needs only the tokenizer and the data (no lit_model.pth). Into an out_dir
    that holds a trained run, the report goes to seq_lengths.dry_run.json, leaving the run's own report alone."""
    scan_workers: int | None = None
    """CPU processes for the length scan (>= 1). Default: the data module's num_workers (at least 1)."""
    group_by_length: bool = False
    """Draw each train optimizer step, and so its micro-batches, from samples of similar length (megabatches of 50
    steps sorted by length, steps in shuffled order; deterministic under --seed), so less of the compute goes to
    padding. Validation is unchanged."""
    pack: bool = False
    """Pack whole train samples into rows of at most max_seq_length tokens (best fit within shuffled groups; rows in
    shuffled order, deterministic under --seed), each micro-batch being micro_batch_size rows. Positions restart and
    attention stays within each sample, so a step trains as on the samples one by one. Validation is unpacked.
    Trains with --seq.loss_weighting token; excludes --seq.group_by_length."""
    loss_weighting: Literal["token", "batch"] | None = None
    """How a step's loss weighs its tokens: "batch" (upstream) averages over each micro-batch, then over the
    micro-batches; "token" divides the sum of the token losses of the whole step (all micro-batches, all ranks) by its
    number of supervised tokens, so every token weighs the same. Unset (default): "token" under --seq.pack true (the
    only weighting packing allows), "batch" otherwise."""
    rehearse: bool = True
    """Before the first step, run the longest train micro-batch (forward + backward; under --seq.pack the fullest
    rows) and the longest val micro-batch (forward), then undo everything (gradients, RNG), so a length or memory failure shows in the first minute."""
    fit_micro_batch: bool = True
    """With --seq.rehearse: when the worst batches run out of memory at --train.micro_batch_size, try smaller sizes
    (keeping --train.global_batch_size and each step's samples: more accumulation) and train with the largest that
    fits. false: stop at the first out-of-memory, as upstream."""
    memory_margin: float = 0.1
    """On CUDA, the share of the device's memory the rehearsal's peak must leave free (fragmentation, allocator
    variance): a micro-batch size that leaves less counts as not fitting. CPU reports no total: out of memory decides."""

    @property
    def order(self) -> str:
        """The train batch order: "packed", "grouped" (by length) or "random"."""
        return "packed" if self.pack else "grouped" if self.group_by_length else "random"

    @property
    def token_weighting(self) -> bool:
        """Whether a step's loss weighs every supervised token the same: --seq.loss_weighting token, or packing with
        --seq.loss_weighting unset (packing with "batch" is refused by the settings check)."""
        return self.loss_weighting == "token" or (self.loss_weighting is None and self.pack)


Resume = bool | Literal["auto"] | Path


def parse_resume(value: object) -> Resume:
    """``--resume`` as litgpt's ``finetune_full`` takes it: False, True, "auto" or a Path (strings accepted too)."""
    if isinstance(value, (bool, Path)):
        return value
    if value is None:
        return False
    text = str(value).strip()
    lowered = text.lower()
    if lowered in ("false", "no", "0", ""):
        return False
    if lowered in ("true", "yes", "1"):
        return True
    if lowered == "auto":
        return "auto"
    return Path(text)
