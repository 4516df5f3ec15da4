"""Same run, same data, same model: compared with a checkpoint before any weight is read."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

from litgpt_seqlen.checkpoint.atomic import forget_training_states, remove_stale_temporaries
from litgpt_seqlen.checkpoint.layout import BASE_WEIGHTS, sampled_difference, sampled_fingerprint
from litgpt_seqlen.checkpoint.lookup import read_header
from litgpt_seqlen.checkpoint.state import RUN_LENGTH_FLAGS, Resumption
from litgpt_seqlen.errors import UserInputError

# --seq.* flags that do not change what is trained (every other, present or future, must match to resume)
# The data module's settings that make other tokens or labels of the same examples (the examples are fingerprinted).
DATA_FLAGS = ("prompt_style", "mask_prompt", "ignore_index")
SEQ_FLAGS_NOT_RUN_CHANGING = ("dry_run", "scan_workers", "rehearse", "fit_micro_batch", "memory_margin")
SAMPLE_DIGEST = 4  # bytes of each sample's sha256 kept in state.json, to name the first changed sample
# What litgpt's Tokenizer reads from checkpoint_dir: the ids and the special tokens the samples are made of.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json")


def run_flags(method, train, seq, seed: int, world_size: int, optimizer, precision, config, data=None) -> dict:
    """The flags that change the trained weights, keyed by flag name (so a mismatch reads ``--seed was 1, now 2``):
    the method's own among them (``method.config_flags``, read back from the config they went into), and the data
    module's that turn the same example into other tokens or labels (``DATA_FLAGS``)."""
    flags = {
        f"train.{name}": getattr(train, name)
        for name in (
            "micro_batch_size",
            "global_batch_size",
            "max_seq_length",
            "epochs",
            "max_steps",
            "lr_warmup_steps",
        )
    }
    flags.update(method=method.command, seed=seed, devices=world_size, optimizer=optimizer, precision=precision)
    flags.update(
        {f"seq.{name}": value for name, value in asdict(seq).items() if name not in SEQ_FLAGS_NOT_RUN_CHANGING}
    )
    flags.update({name: getattr(config, name) for name in method.config_flags})
    for name in DATA_FLAGS:
        if hasattr(data, name):
            value = getattr(data, name)  # a PromptStyle object by its class: its repr holds an address
            flags[f"data.{name}"] = (
                value if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
            )
    return normalized(flags)


def data_fingerprint(
    lengths: Mapping[str, Sequence[int]], contents: Mapping[str, Iterable[bytes]] | None = None
) -> dict:
    """Per split: the sample count, a sha256 of the token lengths and the lengths (to say where they differ); with
    ``contents`` (per split, each sample's bytes in dataset order, ``sample_contents``) also ``content_fingerprint``."""
    fingerprint = {}
    for name, values in lengths.items():
        fingerprint[name] = {
            "count": len(values),
            "sha256": hashlib.sha256(json.dumps(list(values)).encode()).hexdigest(),
            "lengths": list(values),
        }
        if contents is not None:
            fingerprint[name].update(content_fingerprint(contents[name]))
    return fingerprint


def content_fingerprint(samples: Iterable[bytes]) -> dict:
    """``content_sha256``: a sha256 over every sample's sha256, in order (any change to any sample changes it);
    ``sample_digests``: the first ``SAMPLE_DIGEST`` bytes of each sample's sha256, base64 (to say which one changed)."""
    whole, short = hashlib.sha256(), bytearray()
    for sample in samples:
        digest = hashlib.sha256(sample).digest()
        whole.update(digest)
        short += digest[:SAMPLE_DIGEST]
    return {"content_sha256": whole.hexdigest(), "sample_digests": base64.b64encode(bytes(short)).decode()}


def sample_contents(dataset) -> Iterator[bytes]:
    """Each sample of ``dataset`` as bytes, in dataset order, without tokenizing: the raw example of litgpt's
    ``SFTDataset`` (its ``.data``, as JSON with sorted keys), which with the flags and the tokenizer makes the item;
    for a dataset without such a list, its items (token ids and labels) as JSON."""
    samples = getattr(dataset, "data", None)
    if not (hasattr(samples, "__getitem__") and hasattr(samples, "__len__") and len(samples) == len(dataset)):
        samples = dataset
    for index in range(len(samples)):
        yield json.dumps(samples[index], sort_keys=True, default=as_json).encode()


def as_json(value: object) -> object:
    tolist = getattr(value, "tolist", None)  # a tensor or an array: its numbers
    return tolist() if callable(tolist) else repr(value)


def first_changed_sample(saved: str, now: str) -> int | None:
    """The index of the first sample whose digest differs (``content_fingerprint``'s ``sample_digests``)."""
    saved_bytes, now_bytes = base64.b64decode(saved), base64.b64decode(now)
    for index in range(min(len(saved_bytes), len(now_bytes)) // SAMPLE_DIGEST):
        window = slice(index * SAMPLE_DIGEST, (index + 1) * SAMPLE_DIGEST)
        if saved_bytes[window] != now_bytes[window]:
            return index
    return None


def decision_record(max_seq_length: int, kept: Mapping[str, Sequence[int]], counts: Mapping[str, int]) -> dict:
    """The length decision as saved: max_seq_length and, per split, the indices left out (kept = all others)."""
    dropped = {name: sorted(set(range(counts[name])) - set(kept[name])) for name in kept}
    return {"max_seq_length": max_seq_length, "dropped": dropped, "counts": dict(counts)}


def kept_from_record(record: dict) -> dict[str, list[int]]:
    """The kept sample indices per split, in dataset order, from ``decision_record``'s output."""
    kept = {}
    for name, dropped in record["dropped"].items():
        left_out = set(dropped)
        kept[name] = [i for i in range(record["counts"][name]) if i not in left_out]
    return kept


def check_same_run(saved: dict, current: dict, checkpoint: str = "the checkpoint", where=None) -> None:
    """Raises UserInputError naming every setting (``run``) and every split (``data``) that differs between the
    checkpoint's header and this run. Both are dicts with ``run`` (flag name -> value) and ``data``
    (``data_fingerprint``). A key only one side has is not compared. ``where(split, index)`` names a sample's place
    in the user's file (or None)."""
    problems = []
    for name, was in saved.get("run", {}).items():
        if name in RUN_LENGTH_FLAGS or name not in current.get("run", {}):
            continue
        now = current["run"][name]
        if normalized(now) != normalized(was):
            problems.append(
                f"it was trained by {was}, not {now}" if name == "method" else f"--{name} was {was!r}, now {now!r}"
            )
    for split, was in saved.get("data", {}).items():
        problem = split_problem(split, was, current.get("data", {}).get(split), where or (lambda split, index: None))
        if problem:
            problems.append(problem)
    if problems:
        raise UserInputError(
            f"cannot resume from {checkpoint}: this run differs from the one that saved it: "
            + "; ".join(problems)
            + ". Resume with the same data and flags, or start a new run with --resume false (or another --out_dir)."
        )


def split_problem(split: str, was: dict, now: dict | None, where) -> str | None:
    """What differs between a split's saved and current ``data_fingerprint``, in words; None when nothing does."""

    def place(index: int) -> str:
        found = where(split, index)
        return f" ({found})" if found else ""

    if now is None:
        return f"the {split} split is missing now ({was['count']} samples then)"
    if now["count"] != was["count"]:
        return f"the {split} split had {was['count']} samples, now {now['count']}"
    if now["sha256"] != was["sha256"]:
        index = next((i for i, (a, b) in enumerate(zip(was["lengths"], now["lengths"])) if a != b), None)
        at = (
            f": {split} sample {index} had {was['lengths'][index]} tokens, now {now['lengths'][index]}{place(index)}"
            if index is not None
            else ""
        )
        return f"the {split} split has the same count but other token lengths{at}"
    if "content_sha256" in was and "content_sha256" in now and was["content_sha256"] != now["content_sha256"]:
        index = first_changed_sample(was["sample_digests"], now["sample_digests"])
        at = f": {split} sample {index} differs{place(index)}" if index is not None else ""
        return f"the {split} split has the same token lengths but other content{at}"
    return None


def normalized(value: object) -> object:
    return json.loads(json.dumps(value, default=str))


def check_same_model(step_dir: Path, checkpoint_dir: Path) -> None:
    """The base model must be the checkpoint's (a LoRA state fits only its base model): the step directory's
    model_config.yaml the same as checkpoint_dir's, its tokenizer files the ones recorded in the checkpoint's
    state.json (``tokenizer_fingerprint``: the same lengths can hide other ids), and checkpoint_dir's lit_model.pth the
    one recorded there (``base_fingerprint``; not compared where there is none: a dry run needs no weights)."""
    import yaml

    saved = yaml.safe_load((Path(step_dir) / "model_config.yaml").read_text())
    base = yaml.safe_load((Path(checkpoint_dir) / "model_config.yaml").read_text())
    changed = sorted(key for key in set(saved) | set(base) if saved.get(key) != base.get(key))
    if changed:
        shown = ", ".join(f"{key}: {saved.get(key)!r} there, {base.get(key)!r} here" for key in changed[:5])
        raise UserInputError(
            f"--resume {step_dir}: that checkpoint was trained on another base model than checkpoint_dir"
            f" {checkpoint_dir} ({shown}). Pass the checkpoint_dir it was trained from."
        )
    header = read_header(step_dir)
    recorded = header.get("tokenizer")
    changed = tokenizer_difference(recorded, tokenizer_fingerprint(checkpoint_dir)) if recorded is not None else None
    if changed:
        raise UserInputError(
            f"--resume {step_dir}: that checkpoint was trained with another tokenizer than checkpoint_dir"
            f" {checkpoint_dir} has ({changed}); the same text would now be other token ids. Pass the checkpoint_dir"
            " it was trained from, or start a new run with --resume false (or another --out_dir)."
        )
    weights = header.get("base")
    now = base_fingerprint(checkpoint_dir) if weights else None
    difference = sampled_difference(weights, now) if now else None
    if difference:
        raise UserInputError(
            f"--resume {step_dir}: that checkpoint was trained on other base weights than checkpoint_dir"
            f" {checkpoint_dir} ({Path(checkpoint_dir) / BASE_WEIGHTS}: {difference}; it was trained from"
            f" {weights['path']}). Pass the checkpoint_dir it was trained from, or start a new run with --resume false"
            " (or another --out_dir)."
        )


def tokenizer_fingerprint(checkpoint_dir: Path) -> dict:
    """The sha256 of each of checkpoint_dir's ``TOKENIZER_FILES`` that exists, by file name."""
    found = {name: Path(checkpoint_dir) / name for name in TOKENIZER_FILES}
    return {name: hashlib.sha256(path.read_bytes()).hexdigest() for name, path in found.items() if path.is_file()}


def tokenizer_difference(saved: dict, now: dict) -> str | None:
    """The tokenizer files that differ between a checkpoint's record and now, in words; None when none does."""
    words = {True: "changed", False: "added"}
    changed = [
        f"{name} {words[name in saved] if name in now else 'removed'}"
        for name in sorted(set(saved) | set(now))
        if saved.get(name) != now.get(name)
    ]
    return ", ".join(changed) or None


def base_fingerprint(checkpoint_dir: Path) -> dict | None:
    """The sampled fingerprint of checkpoint_dir's lit_model.pth, with its path; None when there is none."""
    path = Path(checkpoint_dir) / BASE_WEIGHTS
    return {**sampled_fingerprint(path), "path": str(path)} if path.is_file() else None


def plan_as_saved(fabric, plan, record: dict):
    """The plan, checked against the checkpoint's length decision (max_seq_length, kept samples). With the same data
    and flags (checked before) they agree unless another version of this code decides differently; then the run
    cannot go on exactly, and stops before any weight is read."""
    kept = kept_from_record(record)
    if record["max_seq_length"] == plan.decision.max_seq_length and kept == plan.kept:
        return plan
    changed = [
        f"split {name}: {len(kept[name])} samples kept then, {len(plan.kept[name])} now"
        for name in kept
        if kept[name] != plan.kept.get(name)
    ]
    raise UserInputError(
        f"cannot resume: the checkpoint trained with max_seq_length {record['max_seq_length']}, this run decides"
        f" {plan.decision.max_seq_length} from the same data and flags{(' (' + '; '.join(changed) + ')') if changed else ''}"
        " (was litgpt-seqlen updated in between?). Resume with the version that saved it, or start a new run."
    )


def begin(fabric, out_dir: Path, step_dir: Path | None, plan, run: dict, *, saves: bool, base: Path | None = None):
    """After the scan, before any weight: checks this run against the checkpoint (``step_dir``; None for a fresh
    run) and takes the length decision from it, tidies ``out_dir`` (``tidy_out_dir``), and makes the header this run's
    checkpoints will hold. ``saves``: the run trains (a signal makes any such run save); ``plan`` is a ``LengthPlan``;
    ``base`` the checkpoint_dir, whose weights and tokenizer a run that saves records. Returns (Resumption, plan)."""
    data = None  # a dry run that resumes nothing compares and records nothing: no pass over the samples
    if saves or step_dir is not None:
        contents = {name: sample_contents(plan.datasets[name]) for name in ("train", "val")}
        data = data_fingerprint({name: plan.lengths[name] for name in ("train", "val")}, contents)
    saved = None
    if step_dir is not None:
        saved = read_header(step_dir)
        check_same_run(saved, {"run": run, "data": data}, str(step_dir), where=plan.where)
        plan = plan_as_saved(fabric, plan, saved["decision"])
    tidy_out_dir(fabric, out_dir, forget_earlier_run=step_dir is None and saves)
    counts = {name: len(plan.lengths[name]) for name in plan.kept}
    decision = decision_record(plan.decision.max_seq_length, plan.kept, counts)
    recorded = base if saves else None
    parts = {
        "run": run,
        "data": data,
        "decision": decision,
        "base": base_fingerprint(recorded) if recorded else None,
        "tokenizer": tokenizer_fingerprint(recorded) if recorded else None,
    }
    return Resumption(step_dir, saved, parts), plan


def tidy_out_dir(fabric, out_dir: Path, forget_earlier_run: bool) -> None:
    """On rank 0, then every rank meets: removes what a killed save left; ``forget_earlier_run`` (a fresh run that
    trains) makes an earlier run's checkpoints non-resumable, their weights kept."""
    if fabric.global_rank == 0:
        for path in remove_stale_temporaries(out_dir):
            fabric.print(f"Removed {path}: left by a save that did not finish.")
        forgotten = forget_training_states(out_dir) if forget_earlier_run else []
        if forgotten:
            fabric.print(
                f"Starting fresh (--resume false) in --out_dir {out_dir}: {', '.join(forgotten)} of an earlier run are"
                " no longer resumable (their weights stay)."
            )
    fabric.barrier()
