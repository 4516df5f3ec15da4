"""LoRA fine-tuning with litgpt that decides max_seq_length from all the data, before the model exists.

A drop-in for ``litgpt finetune_lora``: same flags, same outputs, plus the ``--seq.*`` group. The path is straight:

    parse -> tokenizer + data -> scan lengths -> decide max_seq_length -> apply the over-length policy + report
          -> build GPT, load weights -> fit -> validate -> save

Everything before "build GPT" needs only the tokenizer and the data. The length logic lives in ``data_utils``.
"""

import contextlib
import dataclasses
import inspect
import json
import math
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import lightning as L
import numpy as np
import torch
import yaml
from lightning.fabric.plugins import BitsandbytesPrecision
from lightning.fabric.strategies import ModelParallelStrategy
from lightning.fabric.utilities import ThroughputMonitor
from lightning.pytorch.core.hooks import DataHooks
from torch.utils.data import DataLoader, RandomSampler, Sampler, Subset
from torchmetrics import RunningMean

import data_utils
from data_utils import UserInputError
from litgpt.args import EvalArgs, TrainArgs
from litgpt.data import Alpaca, DataModule
from litgpt.finetune.lora import (
    generate_example,
    get_lr_scheduler,
    parallelize_fn,
    save_lora_checkpoint,
    validate,
    validate_args,
)
from litgpt.finetune.lora import setup as litgpt_finetune_lora
from litgpt.lora import GPT, Config, mark_only_lora_as_trainable
from litgpt.parser_config import save_hyperparameters
from litgpt.prompts import save_prompt_style
from litgpt.scripts.merge_lora import merge_lora
from litgpt.tokenizer import Tokenizer
from litgpt.utils import (  # building blocks, imported rather than rewritten
    CLI, CycleIterator, auto_download_checkpoint, choose_logger, chunked_cross_entropy, copy_config_files,
    create_finetuning_performance_report, get_default_supported_precision, init_out_dir, instantiate_bnb_optimizer,
    instantiate_torch_optimizer, load_checkpoint, num_parameters, parse_devices,
)


@dataclass
class SeqArgs:
    """Sequence-length arguments (new in this entry point)"""

    headroom: float = 0.1
    """Margin above the longest sample when max_seq_length is sized from the data: 0.1 adds 10%. Capped at block_size."""
    over_length: Literal["truncate", "drop", "error"] = "truncate"
    """What happens to samples longer than max_seq_length: cut them, leave them out (kept in
    OUT_DIR/dropped_samples.jsonl), or stop before the model is built."""
    dry_run: bool = False
    """Scan, decide and report, then exit: needs only the tokenizer and the data (no lit_model.pth)."""
    scan_workers: int | None = None
    """CPU processes for the length scan. Default: the data module's num_workers (at least 1)."""
    group_by_length: bool = False
    """Draw each train micro-batch from samples of similar length (megabatches of 50 micro-batches sorted by length,
    in shuffled order; deterministic under --seed), so less of the compute goes to padding. Validation is unchanged."""
    rehearse: bool = True
    """Before the first step, run the longest train micro-batch (forward + backward) and the longest val micro-batch
    (forward), then undo everything (gradients, RNG), so a length or memory failure shows in the first minute."""


def litgpt_flags_and_seq(function):
    """Gives ``function`` the signature and argument docs of litgpt's own ``finetune_lora`` plus ``seq``: the CLI
    (jsonargparse reads both) then takes every upstream flag with its default and help, and stays in step with it."""
    upstream = litgpt_finetune_lora
    seq = inspect.Parameter("seq", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=SeqArgs(), annotation=SeqArgs)
    function.__signature__ = inspect.signature(upstream).replace(parameters=[*inspect.signature(upstream).parameters.values(), seq])
    upstream_arguments = upstream.__doc__.partition("Arguments:")[2].rstrip()
    function.__doc__ += (
        f"\n\n    Arguments:{upstream_arguments}\n"
        "        seq: Sequence-length arguments (new here): headroom, over-length policy, dry run, scan workers, grouping,"
        " rehearsal.\n    "
    )
    return function


@litgpt_flags_and_seq
def setup(*args, **kwargs) -> None:
    """Fine-tune a model with LoRA, with max_seq_length decided from train, val (and test) before the model is built."""
    given = setup.__signature__.bind(*args, **kwargs)
    given.apply_defaults()
    a = SimpleNamespace(**given.arguments)
    lora_settings = {name: value for name, value in given.arguments.items() if name.startswith("lora_")}
    train, eval, seq = a.train, a.eval, a.seq
    data_utils.check_settings(seq.headroom, train.max_seq_length, seq.over_length)
    try:
        validate_args(train, eval)
    except ValueError as problem:
        raise UserInputError(str(problem)) from None
    checkpoint_dir = find_checkpoint_dir(Path(a.checkpoint_dir), a.access_token, need_weights=not seq.dry_run)
    data = Alpaca() if a.data is None else a.data
    devices, num_nodes = parse_devices(a.devices), a.num_nodes
    out_dir = init_out_dir(Path(a.out_dir))
    config = Config.from_file(checkpoint_dir / "model_config.yaml", **lora_settings)
    precision = a.precision or get_default_supported_precision(training=True)
    logger = choose_logger(
        a.logger_name, out_dir, name=f"finetune-{config.name}", log_interval=train.log_interval, log_args=dataclasses.asdict(a.log)
    )

    plugins = None
    if a.quantize is not None and a.quantize.startswith("bnb."):
        if "mixed" in precision:
            raise UserInputError("--quantize cannot be combined with a mixed --precision; use e.g. bf16-true.")
        dtype = {"16-true": torch.float16, "bf16-true": torch.bfloat16, "32-true": torch.float32}[precision]
        plugins = BitsandbytesPrecision(a.quantize[4:], dtype)
        precision = None

    strategy = "auto"
    if devices * num_nodes > 1:
        if a.quantize:
            raise UserInputError("--quantize works on a single device only: set --devices 1 --num_nodes 1.")
        strategy = ModelParallelStrategy(
            parallelize_fn=parallelize_fn, data_parallel_size=devices * num_nodes, tensor_parallel_size=1
        )

    fabric = L.Fabric(
        devices=devices, num_nodes=num_nodes, strategy=strategy, precision=precision, loggers=logger, plugins=plugins
    )
    fabric.launch(main, config, data, checkpoint_dir, out_dir, train, eval, seq, a.optimizer, precision, a.seed, devices, num_nodes)


def find_checkpoint_dir(checkpoint_dir: Path, access_token: str | None, need_weights: bool) -> Path:
    """The checkpoint directory, downloaded as upstream does when it names a Hub model; checked for what we read."""
    if not checkpoint_dir.is_dir():
        try:
            checkpoint_dir = auto_download_checkpoint(model_name=checkpoint_dir, access_token=access_token, ignore_tokenizer_files=True)
        except Exception as problem:
            raise UserInputError(f"checkpoint_dir {str(checkpoint_dir)!r} is not a directory and could not be downloaded ({problem}).") from None
    missing = [name for name, present in (
        ("model_config.yaml", (checkpoint_dir / "model_config.yaml").is_file()),
        ("tokenizer.json or tokenizer.model", (checkpoint_dir / "tokenizer.json").is_file() or (checkpoint_dir / "tokenizer.model").is_file()),
        ("lit_model.pth", (checkpoint_dir / "lit_model.pth").is_file() or not need_weights),
    ) if not present]
    if missing:
        dry_run_hint = " (--seq.dry_run true needs no lit_model.pth)" if missing == ["lit_model.pth"] else ""
        raise UserInputError(f"checkpoint_dir {str(checkpoint_dir)!r} is missing {', '.join(missing)}{dry_run_hint}.")
    return checkpoint_dir


def main(
    fabric: L.Fabric, config: Config, data: DataModule, checkpoint_dir: Path, out_dir: Path, train: TrainArgs,
    eval: EvalArgs, seq: SeqArgs, optimizer: str | dict, precision: str | None, seed: int, devices: int, num_nodes: int,
) -> None:
    # 1. Lengths: tokenizer and data only.
    tokenizer = Tokenizer(checkpoint_dir)
    splits = load_splits(fabric, data, tokenizer, train.micro_batch_size, max_seq_length=None)
    workers = seq.scan_workers if seq.scan_workers is not None else max(1, getattr(data, "num_workers", 1))
    lengths = {name: scan_split(fabric, loader.dataset, name, workers) for name, loader in splits.items()}
    decision = data_utils.decide_max_seq_length(lengths, config.block_size, seq.headroom, train.max_seq_length)
    if decision.capped and decision.source == "override":
        fabric.print(f"warning: --train.max_seq_length {decision.wanted} is above the model's block_size {decision.block_size}; using {decision.block_size}.")
    kept = data_utils.apply_over_length(lengths, decision, seq.over_length)
    kept_lengths = {name: [lengths[name][i] for i in kept[name]] for name in kept}  # in the order the loaders see
    report = build_report(lengths, kept, decision, seq)
    if fabric.global_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        if seq.over_length == "drop":
            dropped = [
                (name, i, n[i], splits[name].dataset.data[i])
                for name, n in lengths.items()
                for i in data_utils.over_limit(n, decision.max_seq_length)
            ]
            data_utils.write_dropped(out_dir / "dropped_samples.jsonl", dropped)
        print_report(fabric, report, lengths, decision)
        write_report(out_dir, report)
    fabric.log_dict(key_figures(report), step=0)
    if seq.dry_run:
        fabric.print("dry run: nothing trained (--seq.dry_run true).")
        return

    # 2. The data with the decided length; then the model.
    splits = load_splits(fabric, data, tokenizer, train.micro_batch_size, max_seq_length=decision.max_seq_length)
    train_loader = keep_samples(splits["train"], kept["train"])
    val_loader = keep_samples(splits["val"], kept["val"])
    if seq.group_by_length:
        sampler = GroupedBatchSampler(kept_lengths["train"], train.micro_batch_size, seed, fabric.global_rank, fabric.world_size)
        train_loader = DataLoader(train_loader.dataset, batch_sampler=sampler, num_workers=train_loader.num_workers, collate_fn=train_loader.collate_fn)
        train_loader = fabric.setup_dataloaders(train_loader, use_distributed_sampler=False)  # it splits by rank itself
        val_loader = fabric.setup_dataloaders(val_loader)
    else:
        train_loader, val_loader = fabric.setup_dataloaders(train_loader, val_loader)
    report["batches"] = measure_padding(fabric, train_loader, kept_lengths["train"], decision.max_seq_length)
    report["batches"].update(micro_batch_size=train.micro_batch_size, group_by_length=seq.group_by_length)
    if fabric.global_rank == 0:
        write_report(out_dir, report)
    fabric.print(
        f"train batches: {report['batches']['efficiency']:.1%} of the tokens are real, the rest padding"
        f" (epoch 1, micro_batch_size {train.micro_batch_size}, group_by_length {str(seq.group_by_length).lower()})"
    )
    steps_per_epoch = len(train_loader) // train.gradient_accumulation_iters(devices, num_nodes)
    lr_max_steps = min(train.epochs * steps_per_epoch, (train.max_steps or float("inf")))

    fabric.seed_everything(seed)  # the same on every rank, for model init
    with fabric.init_module(empty_init=(fabric.world_size > 1)):
        model = GPT(config)
    model.max_seq_length = decision.max_seq_length
    mark_only_lora_as_trainable(model)
    fabric.print(f"Number of trainable parameters: {num_parameters(model, requires_grad=True):,}")
    fabric.print(f"Number of non-trainable parameters: {num_parameters(model, requires_grad=False):,}")
    model = fabric.setup_module(model)
    if isinstance(fabric.strategy.precision, BitsandbytesPrecision):
        optimizer = instantiate_bnb_optimizer(optimizer, model.parameters())
        swap_in_stable_embedding(model)
    else:
        optimizer = instantiate_torch_optimizer(optimizer, model.parameters())
    optimizer = fabric.setup_optimizers(optimizer)
    scheduler = get_lr_scheduler(optimizer, warmup_steps=train.lr_warmup_steps, max_steps=lr_max_steps)
    load_checkpoint(fabric, model, checkpoint_dir / "lit_model.pth", strict=False)

    # 3. Rehearse the worst case (the longest micro-batches), then train, validate, save.
    if seq.rehearse:
        batches = rehearsal_batches({"train": train_loader, "val": val_loader}, kept_lengths, train.micro_batch_size)
        report["rehearsal"] = rehearse(fabric, model, optimizer, batches, train, decision)
        if fabric.global_rank == 0:
            write_report(out_dir, report)
    started = time.perf_counter()
    token_counts = fit(
        fabric, model, optimizer, scheduler, train_loader, val_loader, data, tokenizer, checkpoint_dir, out_dir, train, eval,
        decision, devices, num_nodes, verify=not seq.rehearse,
    )
    fabric.print(create_finetuning_performance_report(time.perf_counter() - started, token_counts, fabric.device.type))

    if eval.final_validation:
        val_loss = validate(fabric, model, val_loader, dataclasses.replace(eval, max_iters=len(val_loader)))
        fabric.log_dict({"val_loss": val_loss, "val_ppl": math.exp(val_loss)})
        fabric.print(f"Final evaluation | val loss: {val_loss.item():.3f} | val ppl: {math.exp(val_loss):.3f}")

    save_checkpoint(fabric, model, out_dir / "final", checkpoint_dir, data, decision)
    if fabric.global_rank == 0:
        merge_lora(checkpoint_dir=out_dir / "final", pretrained_checkpoint_dir=checkpoint_dir, precision=precision)
    fabric.barrier()
    fabric.print(decision.summary())


def load_splits(fabric: L.Fabric, data: DataModule, tokenizer: Tokenizer, batch_size: int, max_seq_length: int | None) -> dict[str, DataLoader]:
    """The data module's loaders for train, val and (when it has one) test, with samples cut at ``max_seq_length``."""
    data.connect(tokenizer=tokenizer, batch_size=batch_size, max_seq_length=max_seq_length)
    with fabric.rank_zero_first():
        data.prepare_data()
    data.setup()

    def empty(name: str) -> UserInputError:
        hint = " (set --data.val_split_fraction, or add samples to the val file)" if name == "val" else ""
        return UserInputError(f"The {name} split of {data!r} is empty{hint}: nothing to {'train on' if name == 'train' else 'validate with'}.")

    try:
        splits = {"train": data.train_dataloader()}
    except ValueError as problem:  # a shuffling loader refuses an empty dataset
        if "num_samples=0" in str(problem):
            raise empty("train") from None
        raise
    splits["val"] = data.val_dataloader()
    if type(data).test_dataloader is not DataHooks.test_dataloader:
        splits["test"] = data.test_dataloader()
    for name in ("train", "val"):
        if len(splits[name].dataset) == 0:
            raise empty(name)
    return splits


def scan_split(fabric: L.Fabric, dataset, split: str, workers: int) -> list[int]:
    """Every sample's length. Each rank scans its own contiguous share; the shares are gathered in order."""
    share = math.ceil(len(dataset) / fabric.world_size)
    start = min(len(dataset), fabric.global_rank * share)
    stop = min(len(dataset), start + share)
    try:
        mine, problem = data_utils.scan_lengths(dataset, split, start, stop, workers, progress=fabric.global_rank == 0), None
    except UserInputError as error:
        mine, problem = [], error
    if fabric.world_size == 1:
        if problem:
            raise problem
        return mine
    # -1 pads a short share; a -2 in the first slot says that rank met bad input (and raises it itself).
    padded = torch.full((share,), -1, dtype=torch.long, device=fabric.device)
    padded[: len(mine)] = torch.tensor(mine, dtype=torch.long)
    if problem:
        padded[0] = -2
    gathered = fabric.all_gather(padded).cpu()
    if problem:
        raise problem
    if (gathered[:, 0] == -2).any():
        raise UserInputError(f"Another rank met bad input in the {split} split; its message is above.")
    return [n for n in gathered.flatten().tolist() if n >= 0]


def keep_samples(loader: DataLoader, indices: list[int]) -> DataLoader:
    """The same loader over only ``indices`` of its dataset (the loader itself when all are kept)."""
    if len(indices) == len(loader.dataset):
        return loader
    shuffle = isinstance(loader.sampler, RandomSampler)
    return DataLoader(
        Subset(loader.dataset, indices),
        batch_size=loader.batch_size,
        shuffle=shuffle,
        generator=loader.generator if shuffle else None,
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
    )


class GroupedBatchSampler(Sampler[list[int]]):
    """Batch sampler for --seq.group_by_length: ``data_utils.grouped_batches`` of this rank, a new epoch per pass."""

    def __init__(self, lengths: list[int], micro_batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.lengths, self.micro_batch_size, self.seed, self.rank, self.world_size = lengths, micro_batch_size, seed, rank, world_size
        self.epoch = 0

    def batches(self, epoch: int) -> list[list[int]]:
        return data_utils.grouped_batches(self.lengths, self.micro_batch_size, self.seed, epoch, rank=self.rank, world_size=self.world_size)

    def __iter__(self):
        epoch, self.epoch = self.epoch, self.epoch + 1
        return iter(self.batches(epoch))

    def __len__(self) -> int:
        return math.ceil(math.ceil(len(self.lengths) / self.micro_batch_size) / self.world_size)


def measure_padding(fabric: L.Fabric, loader: DataLoader, lengths: list[int], max_seq_length: int) -> dict:
    """Real and padded tokens of the first epoch of ``loader`` (set up by Fabric), summed over the ranks.

    Only the batch sampler is read (index lists, nothing is tokenized), and reading it must neither change nor miss
    the batches the run then sees. The grouped sampler is asked for epoch 0 without advancing. A random sampler draws
    from a generator (litgpt's data modules seed one and share it with the loader) that the loader's iterator first
    draws one number from (its workers' base seed): that draw is made here too, then the generator is put back as it
    was. Without a generator both draws come from the global torch RNG, which is put back too (the run reseeds it
    before training in any case, so there the measure is of an equally likely epoch, not of the one trained on)."""
    batch_sampler = loader.batch_sampler
    if isinstance(batch_sampler, GroupedBatchSampler):
        batches = batch_sampler.batches(0)
    else:
        generators = {id(g): g for g in (loader.generator, getattr(loader.sampler, "generator", None)) if g is not None}
        states = {key: g.get_state() for key, g in generators.items()}
        global_state = torch.get_rng_state()
        torch.empty((), dtype=torch.int64).random_(generator=loader.generator)  # as DataLoader.__iter__ does
        batches = list(batch_sampler)
        for key, g in generators.items():
            g.set_state(states[key])
        torch.set_rng_state(global_state)
    measured = data_utils.padding_efficiency(batches, lengths, max_seq_length)
    if fabric.world_size > 1:
        totals = fabric.all_reduce(torch.tensor([measured["real_tokens"], measured["padded_tokens"]], dtype=torch.float64, device=fabric.device), reduce_op="sum")
        real, padded = (int(x) for x in totals.tolist())
        measured.update(real_tokens=real, padded_tokens=padded, efficiency=real / padded if padded else 1.0, count=measured["count"] * fabric.world_size)
    measured["efficiency"] = round(measured["efficiency"], 6)
    return measured


def build_report(lengths: dict[str, list[int]], kept: dict[str, list[int]], decision: data_utils.Decision, seq: SeqArgs) -> dict:
    splits = {}
    for name, split_lengths in lengths.items():
        splits[name] = data_utils.split_stats(split_lengths, decision.max_seq_length)
        if seq.over_length == "drop":
            splits[name]["dropped"] = len(split_lengths) - len(kept[name])
            splits[name]["tokens_truncated"] = 0
    every_length = [n for split_lengths in lengths.values() for n in split_lengths]
    return {
        "max_seq_length": decision.max_seq_length,
        "source": decision.source,
        "longest": decision.longest,
        "longest_split": decision.longest_split,
        "headroom": decision.headroom,
        "block_size": decision.block_size,
        "capped": decision.capped,
        "over_length": seq.over_length,
        "summary": decision.summary(),
        "splits": splits,
        "what_if": data_utils.what_if(every_length, decision.block_size, chosen=decision.max_seq_length),
    }


def print_report(fabric: L.Fabric, report: dict, lengths: dict[str, list[int]], decision: data_utils.Decision) -> None:
    fabric.print(decision.summary())
    columns = ("count", "min", "mean", "p50", "p90", "p99", "max", "argmax", "over_limit", "tokens_truncated")
    extra = ("dropped",) if report["over_length"] == "drop" else ()
    fabric.print("  split  " + " ".join(f"{c:>10}" for c in columns + extra))
    for name, stats in report["splits"].items():
        fabric.print(f"  {name:<6} " + " ".join(f"{stats[c]:>10}" for c in columns + extra))
    fabric.print(data_utils.format_what_if(report["what_if"], decision.block_size))
    for name, split_lengths in lengths.items():
        fabric.print(f"lengths in {name}:")
        fabric.print(data_utils.histogram(split_lengths, decision.max_seq_length, decision.block_size))


def write_report(out_dir: Path, report: dict) -> None:
    (out_dir / "seq_lengths.json").write_text(json.dumps(report, indent=2) + "\n")


def key_figures(report: dict) -> dict:
    figures = {"seq/longest": report["longest"], "seq/max_seq_length": report["max_seq_length"]}
    for name, stats in report["splits"].items():
        for key in ("p50", "p99", "max", "over_limit"):
            figures[f"seq/{name}_{key}"] = stats[key]
    return figures


def swap_in_stable_embedding(model) -> None:
    """bitsandbytes' 8-bit optimizers want a StableEmbedding in place of the token embedding."""
    from bitsandbytes.nn import StableEmbedding

    old = model.transformer.wte
    new = StableEmbedding(old.num_embeddings, old.embedding_dim)
    with torch.no_grad():
        new.weight.copy_(old.weight)
    model.transformer.wte = new.to(device=old.weight.device, dtype=old.weight.dtype)


@contextlib.contextmanager
def preserved_rng():
    """Puts back the python, numpy, torch CPU and CUDA random states on the way out, whatever ran inside."""
    states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


def rehearsal_batches(loaders: dict[str, DataLoader], lengths: dict[str, list[int]], batch_size: int) -> dict[str, dict]:
    """For each loader, its largest micro-batch: the ``batch_size`` longest samples of its dataset (whose sample
    lengths are ``lengths[name]``, in dataset order), collated with the loader's own collate_fn."""
    batches = {}
    for name, loader in loaders.items():
        indices = data_utils.longest_batch(lengths[name], batch_size)
        batches[name] = loader.collate_fn([loader.dataset[i] for i in indices])
    return batches


def rehearse(fabric: L.Fabric, model, optimizer, batches: dict[str, dict], train: TrainArgs, decision: data_utils.Decision) -> dict:
    """One forward + backward on ``batches["train"]`` and one forward (no grad) on ``batches["val"]``, as fit and
    validate run them. Then it is undone: gradients dropped (as a fresh optimizer has them), no optimizer step, the RNG
    states put back, the model in train mode. Returns what it measured; out of memory is a UserInputError."""
    shapes = {name: list(batch["input_ids"].shape) for name, batch in batches.items()}
    shown = ", ".join(f"{name} {shape[0]} × {shape[1]}" for name, shape in shapes.items())
    fabric.print(f"Rehearsing the longest micro-batches ({shown} tokens) ...")
    cuda = fabric.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(fabric.device)
        torch.cuda.reset_peak_memory_stats(fabric.device)
        allocated_before = torch.cuda.memory_allocated(fabric.device)
    started = time.perf_counter()
    running = "train"
    try:
        with preserved_rng():
            model.train()
            batch = fabric.to_device(batches["train"])
            logits = model(batch["input_ids"], lm_head_chunk_size=128)
            logits[-1] = logits[-1][..., :-1, :]
            loss = chunked_cross_entropy(logits, batch["labels"][..., 1:])
            fabric.backward(loss / train.gradient_accumulation_iters(fabric.world_size, 1))
            del logits, loss, batch
            optimizer.zero_grad(set_to_none=True)

            running = "val"
            model.eval()
            batch = fabric.to_device(batches["val"])
            with torch.no_grad():
                logits = model(batch["input_ids"])
                chunked_cross_entropy(logits[..., :-1, :], batch["labels"][..., 1:], chunk_size=0)
            del logits, batch
            if cuda:
                torch.cuda.synchronize(fabric.device)
    except torch.OutOfMemoryError:
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.empty_cache()
        raise UserInputError(out_of_memory_message(fabric.device, running, shapes[running], decision)) from None
    finally:
        model.train()
    result = {"train_batch": shapes["train"], "val_batch": shapes["val"], "seconds": round(time.perf_counter() - started, 3), "device": str(fabric.device)}
    if cuda:
        result["peak_memory_bytes"] = torch.cuda.max_memory_allocated(fabric.device)
        result["memory_before_bytes"] = allocated_before  # weights (and whatever else was there): peak - this = the batches' share
        result["device_memory_bytes"] = torch.cuda.get_device_properties(fabric.device).total_memory
    peak = f", peak memory {result['peak_memory_bytes'] / 2**30:.2f} GiB" if cuda else ""
    fabric.print(f"Rehearsal passed in {result['seconds']:.2f} s{peak}.")
    return result


def out_of_memory_message(device: torch.device, split: str, shape: list[int], decision: data_utils.Decision) -> str:
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


def fit(
    fabric: L.Fabric, model: GPT, optimizer: torch.optim.Optimizer, scheduler, train_loader: DataLoader, val_loader: DataLoader,
    data: DataModule, tokenizer: Tokenizer, checkpoint_dir: Path, out_dir: Path, train: TrainArgs, eval: EvalArgs,
    decision: data_utils.Decision, devices: int, num_nodes: int, verify: bool = True,
) -> dict:
    """The training loop. max_seq_length was settled before the model was built; nothing here changes it.

    ``verify``: without an initial validation, run two val batches first as upstream does (not needed after a
    rehearsal). They run with the RNG states put back, as the rehearsal's are, so both runs train alike.
    """
    if eval.initial_validation:
        val_loss = f"{validate(fabric, model, val_loader, dataclasses.replace(eval, max_iters=len(val_loader))):.3f}"
    else:
        if verify:
            fabric.print("Verifying settings ...")
            with preserved_rng():
                validate(fabric, model, val_loader, dataclasses.replace(eval, max_iters=2), verbose=False)
        val_loss = "n/a"

    accumulation = train.gradient_accumulation_iters(devices, num_nodes)
    batches = CycleIterator(train_loader)
    throughput = ThroughputMonitor(fabric, window_size=50)
    running_loss = RunningMean(window=accumulation, sync_on_compute=False).to(fabric.device)
    max_steps = train.max_steps or float("inf")
    max_time = train.max_time or float("inf")
    counts = {key: torch.tensor(0, device=fabric.device, dtype=torch.long) for key in ("raw", "template", "padded")}
    step = iteration = 0
    started = time.perf_counter()

    while step < max_steps:
        iteration += 1
        iteration_started = time.perf_counter()
        batch = next(batches)
        stop = None
        if batches.epoch >= train.epochs:
            stop = f"Number of epochs {train.epochs} reached, stopping training..."
        elif iteration_started - started > max_time:
            stop = f"Max time ({max_time / 60.0:.2f}m) reached, stopping training..."
        if stop:
            if fabric.global_rank == 0:
                generate_example(fabric, model, tokenizer, eval, data)
            fabric.print(stop)
            break

        input_ids, targets = batch["input_ids"], batch["labels"]
        accumulating = iteration % accumulation != 0
        with fabric.no_backward_sync(model, enabled=accumulating):
            logits = model(input_ids, lm_head_chunk_size=128)
            logits[-1] = logits[-1][..., :-1, :]  # output n predicts token n + 1
            loss = chunked_cross_entropy(logits, targets[..., 1:])
            fabric.backward(loss / accumulation)
        running_loss.update(loss.detach())
        if not accumulating:
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            step += 1

        counts["raw"] += batch["token_counts"]["raw"].sum().item()
        counts["template"] += batch["token_counts"]["raw_plus_prompt_template"].sum().item()
        counts["padded"] += input_ids.numel()

        if iteration % train.log_interval == 0:
            now = time.perf_counter()
            throughput.update(time=now - started, batches=iteration, samples=iteration * train.micro_batch_size, lengths=counts["padded"].item())
            throughput.compute_and_log(step=iteration)
            metrics = {
                "loss": running_loss.compute().item(),
                "iter": iteration,
                "step": step,
                "epoch": batches.epoch,
                "iter_time": now - iteration_started,
                "tokens": counts["template"],
                "total_tokens": counts["template"] * fabric.world_size,
                "learning_rate": scheduler.get_last_lr()[0],
            }
            fabric.print(
                f"Epoch {batches.epoch + 1} | iter {iteration} step {step} | loss train: {metrics['loss']:.3f},"
                f" val: {val_loss} | iter time: {metrics['iter_time'] * 1000:.2f} ms{'' if accumulating else ' (step)'}"
            )
            fabric.log_dict(metrics, step=iteration)

        if not accumulating and step % eval.interval == 0:
            val_loss = periodic_validation(fabric, model, val_loader, eval, tokenizer, data, iteration)

        if train.save_interval is not None and not accumulating and step % train.save_interval == 0:
            save_checkpoint(fabric, model, out_dir / f"step-{step:06d}", checkpoint_dir, data, decision)

    totals = {key: fabric.all_reduce(value, reduce_op="sum").item() for key, value in counts.items()}
    return {
        "raw_tokens": totals["raw"],
        "raw_tokens_plus_prompt_template": totals["template"],
        "raw_tokens_plus_prompt_template_and_padding": totals["padded"],
    }


def periodic_validation(fabric: L.Fabric, model, val_loader: DataLoader, eval: EvalArgs, tokenizer: Tokenizer, data: DataModule, iteration: int) -> str:
    """Validation during training: the val loss averaged over the ranks, printed and logged, and (on rank 0) an
    example generated from the model. Returns the loss as the progress lines show it."""
    started = time.perf_counter()
    rank_loss = validate(fabric, model, val_loader, eval)
    if fabric.global_rank == 0:
        generate_example(fabric, model, tokenizer, eval, data)
    loss = fabric.all_reduce(rank_loss.to(fabric.device), reduce_op="mean")  # a collective: every rank waits here
    fabric.print(f"iter {iteration}: val loss {loss.item():.4f}, val time: {(time.perf_counter() - started) * 1000:.2f} ms")
    fabric.log_dict({"val_loss": loss, "val_ppl": math.exp(loss)}, step=iteration)
    return f"{loss.item():.3f}"


def save_checkpoint(fabric: L.Fabric, model, directory: Path, checkpoint_dir: Path, data: DataModule, decision: data_utils.Decision) -> None:
    """LoRA weights, config files, prompt style and hyperparameters, as upstream lays them out."""
    directory.mkdir(parents=True, exist_ok=True)
    save_lora_checkpoint(fabric, model, directory / "lit_model.pth.lora")
    if fabric.global_rank == 0:
        copy_config_files(checkpoint_dir, directory)
        save_hyperparameters(setup, directory)
        record_max_seq_length(directory / "hyperparameters.yaml", decision.max_seq_length)
        save_prompt_style(data.prompt_style, directory)
    fabric.barrier()


def record_max_seq_length(hyperparameters_file: Path, max_seq_length: int) -> None:
    """Write the length the model trained with into hyperparameters.yaml, so rerunning it reproduces the run."""
    hyperparameters = yaml.safe_load(hyperparameters_file.read_text())
    hyperparameters.setdefault("train", {})["max_seq_length"] = max_seq_length
    hyperparameters_file.write_text(yaml.safe_dump(hyperparameters, sort_keys=False))


def cli() -> None:
    torch.set_float32_matmul_precision("high")
    warnings.filterwarnings("ignore", message=r"The epoch parameter in `scheduler.step\(\)` was not necessary", category=UserWarning)
    try:
        CLI(setup)
    except UserInputError as problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    cli()
