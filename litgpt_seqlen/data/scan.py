"""The scan: every sample's prompt and response lengths, exactly as the model will see them, on every rank's share."""

from __future__ import annotations

import functools
import math
import multiprocessing
import os
import signal
import sys
from collections.abc import Mapping

import lightning as L
import torch

import data_utils
from data_utils import SampleParts
from litgpt_seqlen import ranks
from litgpt_seqlen.data.files import sample_problem
from litgpt_seqlen.errors import UserInputError

USER_FIELDS = ("instruction", "input")  # the user's text; every other field is template (sys_prompt, ...)


PLACEHOLDERS = ("x", "y")  # two, so a user text that happens to start or end like one of them does not move a bound


def sample_parts(dataset, index: int, split: str = "?") -> SampleParts:
    """The ``SampleParts`` of ``dataset[index]`` for an untruncated dataset, computed without building the item.

    For litgpt's ``SFTDataset`` (whose ``__getitem__`` encodes the prompt and the response separately and
    concatenates them) the prompt and the response are encoded with the dataset's own tokenizer and prompt style;
    this skips the third encoding (of the bare instruction, for token counts), the label copy and the tensor
    concatenation. ``head`` and ``marker`` come from the same prompt built with placeholder user text (see
    ``template_bounds``). Any other dataset is asked for its item: its prompt is the leading run of ignored labels,
    none of it template.
    """
    from litgpt.data import SFTDataset

    try:
        if type(dataset).__getitem__ is SFTDataset.__getitem__ and dataset.max_seq_length <= 0:
            return _sft_parts(dataset, index, split)
        return _item_parts(dataset[index], getattr(dataset, "ignore_index", -100))
    except KeyError as missing:
        raise UserInputError(
            f"{split} sample {index} has no field {missing.args[0]!r}, which the prompt needs. Every sample needs"
            " 'instruction' and 'output' (and whatever else the --data.prompt_style uses). Fix the data file."
        ) from None


def _sft_parts(dataset, index: int, split: str) -> SampleParts:
    example = dataset.data[index]
    if not isinstance(example, Mapping):
        raise UserInputError(
            f"{split} sample {index} is a {type(example).__name__}, not an object with the fields"
            " 'instruction' and 'output'. Fix the data file."
        )
    if dataset.transform is not None:
        example = dataset.transform(example)
    if (problem := sample_problem(example)) is not None:  # e.g. "output": null, which tokenizers refuse
        raise UserInputError(f"{split} sample {index} {problem} Fix the data file.")
    tokenizer, style = dataset.tokenizer, dataset.prompt_style
    prompt_ids = tokenizer.encode(style.apply(prompt=example["instruction"], **example)).tolist()
    response = len(tokenizer.encode(example["output"], bos=False, eos=True))
    placeholder_ids = [
        _encoded(tokenizer, style.apply(prompt=e["instruction"], **e)) for e in _placeholder_examples(example)
    ]
    head, marker = data_utils.template_bounds(prompt_ids, placeholder_ids)
    return SampleParts(len(prompt_ids), response, head, marker)


def _item_parts(item: Mapping, ignore_index: int) -> SampleParts:
    if "labels" not in item:
        return SampleParts(0, len(item["input_ids"]), 0, 0)
    labels = item["labels"].tolist()
    prompt = next((i for i, label in enumerate(labels) if label != ignore_index), len(labels))
    return SampleParts(prompt, len(labels) - prompt, 0, 0)


def _placeholder_examples(example: Mapping) -> list[dict]:
    """The example with its user text replaced by a placeholder, once per placeholder: the instruction always (every
    template places it, so an empty one still parts head from marker), the input only when given (an empty input
    selects Alpaca's shorter template, which must stay the same)."""
    examples = []
    for placeholder in PLACEHOLDERS:
        copy = dict(example)
        for field in USER_FIELDS:
            if isinstance(copy.get(field), str) and (copy[field] or field == "instruction"):
                copy[field] = placeholder
        examples.append(copy)
    return examples


@functools.lru_cache(maxsize=4096)
def _encoded(tokenizer, prompt: str) -> tuple[int, ...]:
    # A data set has few distinct placeholder prompts (one per template shape), so they are encoded once.
    return tuple(tokenizer.encode(prompt).tolist())


STALL_SECONDS = 60  # a range takes about a second; a worker this late is stuck or gone

# The dataset a forked scan worker reads; set just before the pool forks, so nothing is pickled.
_scan_target: tuple = ()


def _scan_range(bounds: tuple[int, int]) -> list[SampleParts]:
    dataset, split = _scan_target
    return [sample_parts(dataset, i, split) for i in range(*bounds)]


def scan_parts(
    dataset, split: str, start: int = 0, stop: int | None = None, workers: int = 1, progress: bool = False
) -> list[SampleParts]:
    """``SampleParts`` of samples ``start..stop`` of ``dataset``, in order, using ``workers`` forked processes
    (``[p.length for p in ...]`` are the samples' lengths)."""
    global _scan_target
    stop = len(dataset) if stop is None else stop
    count = stop - start
    workers = max(1, min(workers, count // 256))  # a pool is not worth it for a few hundred samples
    chunk = max(1, min(2048, math.ceil(count / (workers * 8))))
    bounds = [(lo, min(lo + chunk, stop)) for lo in range(start, stop, chunk)]
    bar = None
    if progress and count >= 20_000:
        from tqdm import tqdm

        bar = tqdm(total=count, desc=f"scanning {split}", unit="samples", leave=False)

    parts: list[SampleParts] = []
    _scan_target = (dataset, split)
    try:
        for piece in _pieces(bounds, workers, split):
            parts.extend(piece)
            if bar is not None:
                bar.update(len(piece))
    finally:
        _scan_target = ()
        if bar is not None:
            bar.close()
    return parts


def _pieces(bounds: list[tuple[int, int]], workers: int, split: str):
    """The parts of each range of ``bounds``, in order: from a pool of ``workers`` forked processes, and in this
    process for whatever the pool has not delivered when a worker stalls or dies (a forked worker inherits the locks
    of threads it does not have, e.g. a distributed run's communication threads, so this is rare but possible)."""
    delivered = 0
    if workers > 1:
        with start_pool(workers) as pool:
            results = pool.imap(_scan_range, bounds)
            try:
                for delivered in range(1, len(bounds) + 1):
                    yield results.next(timeout=STALL_SECONDS)
            except multiprocessing.TimeoutError:
                delivered -= 1
                print(
                    f"warning: the {split} scan's worker processes gave nothing for {STALL_SECONDS} s; scanning the"
                    f" remaining {len(bounds) - delivered} parts in this process (--seq.scan_workers 1 skips them).",
                    file=sys.stderr,
                    flush=True,
                )
    for bound in bounds[delivered:]:
        yield _scan_range(bound)


def scan_split(fabric: L.Fabric, dataset, split: str, workers: int) -> list[SampleParts]:
    """Every sample's parts. Each rank scans its own contiguous share; the shares are gathered in order."""
    share = math.ceil(len(dataset) / fabric.world_size)
    start = min(len(dataset), fabric.global_rank * share)
    stop = min(len(dataset), start + share)
    problem = None
    try:
        mine = scan_parts(dataset, split, start, stop, workers, progress=fabric.global_rank == 0)
    except UserInputError as error:
        mine, problem = [], error
    ranks.agree_on_error(fabric, problem)  # every rank raises the failing rank's message; rank 0 prints it
    if fabric.world_size == 1:
        return mine
    width = len(SampleParts._fields)  # one row of counts per sample; -1 rows pad a short share
    padded = torch.full((share, width), -1, dtype=torch.long, device=fabric.device)
    if mine:
        padded[: len(mine)] = torch.tensor(mine, dtype=torch.long)
    gathered = fabric.all_gather(padded).cpu()
    return [SampleParts(*row) for row in gathered.reshape(-1, width).tolist() if row[0] >= 0]


STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def start_pool(workers: int):
    """A pool of forked scan workers. Ctrl-C or SIGTERM arriving while it starts is noted and raised once the pool
    stands: raised inside a fork (in another library's at-fork handler) its exception would be printed as ignored and
    lost, and the run would go on."""
    caught: list[int] = []
    previous = {number: signal.signal(number, lambda number, frame: caught.append(number)) for number in STOP_SIGNALS}
    try:
        pool = multiprocessing.get_context("fork").Pool(workers, initializer=start_worker)
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    if caught:
        pool.close()  # not terminate(): a worker not yet past its initializer would only note a SIGTERM
        pool.join()
        signal.raise_signal(caught[0])  # now the run's own handler acts on it
    return pool


def start_worker() -> None:
    """The initializer of a forked scan worker. It ignores Ctrl-C (which the terminal sends to the whole process
    group): the main process gets KeyboardInterrupt, reports it in one line, and the pool's exit ends the workers.
    HF tokenizers refuse their thread pool after a fork; a worker encodes one text at a time, so it needs none."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # forked while start_pool noted signals: the pool ends it with one
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
