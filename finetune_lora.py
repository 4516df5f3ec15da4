"""LoRA fine-tuning with litgpt that decides max_seq_length from all the data, before the model exists.

A drop-in for ``litgpt finetune_lora``: same flags, same outputs, plus the ``--seq.*`` group. The path is straight:

    parse -> tokenizer + data -> scan lengths -> decide max_seq_length -> apply the over-length policy, plan the cuts
          + report -> build GPT, load weights -> rehearse -> fit -> validate -> save

Everything before "build GPT" needs only the tokenizer and the data. This file is the flow; the length work lives in
``seq_data`` (on Fabric), ``data_utils`` (plain functions) and ``truncation`` (how a sample is cut), the rehearsal in
``rehearsal``.
"""

import dataclasses
import inspect
import math
import sys
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import lightning as L
import torch
from jsonargparse import ActionConfigFile, Namespace, set_parsing_settings
from lightning.fabric.plugins import BitsandbytesPrecision
from lightning.fabric.strategies import ModelParallelStrategy
from lightning.fabric.utilities import ThroughputMonitor
from litgpt import utils as litgpt_utils
from litgpt.args import EvalArgs, TrainArgs
from litgpt.data import Alpaca, DataModule
from litgpt.finetune.full import setup as litgpt_finetune_full
from litgpt.finetune.lora import (
    generate_example,
    parallelize_fn,
    save_lora_checkpoint,
    validate,
)
from litgpt.finetune.lora import setup as litgpt_finetune_lora
from litgpt.lora import GPT, Config, mark_only_lora_as_trainable
from litgpt.prompts import save_prompt_style
from litgpt.scripts.merge_lora import merge_lora
from litgpt.tokenizer import Tokenizer
from litgpt.utils import load_checkpoint  # a module-level name: litgpt's own test patches it here
from torch.utils.data import DataLoader
from torchmetrics import RunningMean

import cli_support
import input_checks
import rehearsal
import resume_state
import run_lock
import seq_data
from cli_support import FlowParser
from data_utils import UserInputError
from lr_schedule import get_lr_scheduler
from packed_forward import check_packable
from seq_args import SeqArgs
from token_loss import StepLookahead
from training_loss import train_loss


def setup(checkpoint_dir: Path, seq: SeqArgs = SeqArgs(), resume: resume_state.Resume = False, **litgpt_flags) -> None:
    """Fine-tune a model with LoRA, with max_seq_length decided from train, val (and test) before the model is built.

    ``litgpt_flags`` are the keyword flags of litgpt's own ``finetune_lora`` (``out_dir``, ``precision``, ``train``,
    ``eval``, ``lora_r``, ...), with its defaults; ``seq`` holds the flags this entry point adds; ``resume`` is
    litgpt ``finetune_full``'s: a ``step-*`` directory, ``True`` (the newest complete checkpoint in ``out_dir``,
    an error when there is none), ``"auto"`` (the same, but start fresh when there is none) or ``False``.
    """
    resume = resume_state.parse_resume(resume)
    try:
        flags = inspect.signature(litgpt_finetune_lora).bind(checkpoint_dir, **litgpt_flags)
    except TypeError as problem:
        raise UserInputError(f"{problem} (setup takes litgpt finetune_lora's flags plus seq).") from None
    flags.apply_defaults()
    flags = flags.arguments
    train, eval, seed = flags["train"], flags["eval"], flags["seed"]
    devices, num_nodes = litgpt_utils.parse_devices(flags["devices"]), flags["num_nodes"]
    precision, quantize = (
        flags["precision"] or litgpt_utils.get_default_supported_precision(training=True),
        flags["quantize"],
    )
    out_dir = litgpt_utils.init_out_dir(Path(flags["out_dir"]))
    # Every setting, upstream's included, before anything is read or built; out_dir is created and tried for writing.
    input_checks.check_settings(train, eval, seq, devices, num_nodes, quantize, precision, out_dir)
    with run_lock.hold_out_dir(out_dir, enabled=run_lock.launched_as_rank_zero()):  # one run per out_dir, for its life
        data = flags["data"] or Alpaca()
        located = input_checks.check_data_files(data)  # every sample of the user's files, before a token is made
        checkpoint_dir = find_checkpoint_dir(Path(checkpoint_dir), flags["access_token"], need_weights=not seq.dry_run)
        lora_settings = {name: value for name, value in flags.items() if name.startswith("lora_")}  # Config's names
        config = Config.from_file(checkpoint_dir / "model_config.yaml", **lora_settings)
        if seq.pack:
            check_packable(config)  # from the config alone: before any weight is read, in a dry run too
        logger = litgpt_utils.choose_logger(
            flags["logger_name"],
            out_dir,
            name=f"finetune-{config.name}",
            log_interval=train.log_interval,
            log_args=dataclasses.asdict(flags["log"]),
            resume=bool(resume),
        )

        plugins = None
        if quantize is not None and quantize.startswith("bnb."):  # check_settings saw a -true precision, one device
            dtype = {"16-true": torch.float16, "bf16-true": torch.bfloat16, "32-true": torch.float32}[precision]
            plugins = BitsandbytesPrecision(quantize[4:], dtype)
            precision = None
        strategy = "auto"
        if devices * num_nodes > 1:
            strategy = ModelParallelStrategy(
                parallelize_fn=parallelize_fn, data_parallel_size=devices * num_nodes, tensor_parallel_size=1
            )

        fabric = L.Fabric(
            devices=devices,
            num_nodes=num_nodes,
            strategy=strategy,
            precision=precision,
            loggers=logger,
            plugins=plugins,
        )
        fabric.launch(
            main,
            config=config,
            data=data,
            located=located,
            checkpoint_dir=checkpoint_dir,
            out_dir=out_dir,
            train=train,
            eval=eval,
            seq=seq,
            optimizer=flags["optimizer"],
            precision=precision,
            seed=seed,
            resume=resume,
        )


def find_checkpoint_dir(checkpoint_dir: Path, access_token: str | None, need_weights: bool) -> Path:
    """The checkpoint directory, downloaded as upstream does when it names a Hub model; checked for what we read."""
    if not checkpoint_dir.is_dir():
        try:
            checkpoint_dir = litgpt_utils.auto_download_checkpoint(
                model_name=checkpoint_dir, access_token=access_token, ignore_tokenizer_files=True
            )
        except Exception as problem:
            raise UserInputError(
                f"checkpoint_dir {str(checkpoint_dir)!r} is not a directory and could not be downloaded ({problem})."
            ) from None
    has_tokenizer = (checkpoint_dir / "tokenizer.json").is_file() or (checkpoint_dir / "tokenizer.model").is_file()
    missing = [
        name
        for name, present in (
            ("model_config.yaml", (checkpoint_dir / "model_config.yaml").is_file()),
            ("tokenizer.json or tokenizer.model", has_tokenizer),
            ("lit_model.pth", (checkpoint_dir / "lit_model.pth").is_file() or not need_weights),
        )
        if not present
    ]
    if missing:
        dry_run_hint = " (--seq.dry_run true needs no lit_model.pth)" if missing == ["lit_model.pth"] else ""
        raise UserInputError(f"checkpoint_dir {str(checkpoint_dir)!r} is missing {', '.join(missing)}{dry_run_hint}.")
    return checkpoint_dir


def main(
    fabric: L.Fabric,
    config: Config,
    data: DataModule,
    located: input_checks.DataFiles | None,
    checkpoint_dir: Path,
    out_dir: Path,
    train: TrainArgs,
    eval: EvalArgs,
    seq: SeqArgs,
    optimizer: str | dict,
    precision: str | None,
    seed: int,
    resume: resume_state.Resume = False,
) -> None:
    # 1. Lengths, from the tokenizer and the data only: scan, decide, apply the policy, plan the cuts, report. On
    #    resume, the checkpoint must be of this model, this data, these flags and this decision.
    hyperparameters = captured_hyperparameters()
    resume_from = resume_state.find_checkpoint(out_dir, resume, log=fabric.print)
    if resume_from is not None:
        resume_state.check_same_model(resume_from, checkpoint_dir)
    tokenizer = Tokenizer(checkpoint_dir)
    plan = seq_data.plan_lengths(fabric, data, tokenizer, train, seq, config.block_size, located)
    run = resume_state.run_flags(train, seq, seed, fabric.world_size, optimizer, precision, config)
    resumption, plan = resume_state.begin(fabric, out_dir, resume_from, plan, run, saves=not seq.dry_run)
    decision = plan.decision
    packed = seq_data.packed_micro_batches(fabric, plan, train.micro_batch_size, seed) if seq.pack else None
    plan.warnings += input_checks.check_run(train, eval, plan.kept, fabric.world_size, seq.group_by_length, packed)
    report = seq_data.publish_plan(fabric, out_dir, plan, seq, train.micro_batch_size, seed)
    if resumption.report():
        report["resumed_from"] = resumption.report()
        seq_data.write_report(fabric, out_dir, report)
    if seq.dry_run:
        fabric.print("dry run: nothing trained (--seq.dry_run true).")
        return
    hyperparameters.train.max_seq_length = decision.max_seq_length  # what the model trains with, for a rerun
    if fabric.global_rank == 0 and (earlier := run_lock.earlier_run_warning(out_dir)):
        fabric.print(earlier)

    # 2. The loaders the plan allows; then the model, built with the decided length, and its weights.
    train_loader, val_loader = seq_data.make_loaders(
        fabric, plan, train.micro_batch_size, seq.group_by_length, seed, pack=seq.pack
    )
    steps_per_epoch = len(train_loader) // train.gradient_accumulation_iters(fabric.world_size, 1)
    lr_max_steps = min(train.epochs * steps_per_epoch, (train.max_steps or float("inf")))
    input_checks.check_schedule(train.lr_warmup_steps, lr_max_steps)  # as planned; the loaders have the last word
    fabric.seed_everything(seed)  # the same on every rank, for model init
    with fabric.init_module(empty_init=(fabric.world_size > 1)):
        model = GPT(config)
    model.max_seq_length = decision.max_seq_length
    mark_only_lora_as_trainable(model)
    fabric.print(f"Number of trainable parameters: {litgpt_utils.num_parameters(model, requires_grad=True):,}")
    fabric.print(f"Number of non-trainable parameters: {litgpt_utils.num_parameters(model, requires_grad=False):,}")
    model = fabric.setup_module(model)
    if isinstance(fabric.strategy.precision, BitsandbytesPrecision):
        optimizer = litgpt_utils.instantiate_bnb_optimizer(optimizer, model.parameters())
        swap_in_stable_embedding(model)
    else:
        optimizer = litgpt_utils.instantiate_torch_optimizer(optimizer, model.parameters())
    optimizer = fabric.setup_optimizers(optimizer)
    scheduler = get_lr_scheduler(optimizer, warmup_steps=train.lr_warmup_steps, max_steps=lr_max_steps)
    load_checkpoint(fabric, model, checkpoint_dir / "lit_model.pth", strict=False)
    if resume_from is not None:
        resume_state.load_lora_weights(model, resume_from, fabric.world_size)

    # 3. Rehearse the worst case (the longest micro-batches), then train, validate, save.
    if seq.rehearse:
        loaders = {"train": train_loader, "val": val_loader}
        lengths = {name: plan.kept_lengths(name) for name in loaders}
        batches = rehearsal.rehearsal_batches(loaders, lengths, train.micro_batch_size, decision.max_seq_length)
        report["rehearsal"] = rehearsal.rehearse(fabric, model, optimizer, batches, train, decision)
        seq_data.write_report(fabric, out_dir, report)
    save = partial(save_checkpoint, checkpoint_dir=checkpoint_dir, data=data, hyperparameters=hyperparameters)
    started = time.perf_counter()
    with resume_state.GracefulStop(log=fabric.print) as signals:
        token_counts = fit(
            fabric,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            train_loader=train_loader,
            val_loader=val_loader,
            data=data,
            tokenizer=tokenizer,
            out_dir=out_dir,
            train=train,
            eval=eval,
            save=save,
            verify=not seq.rehearse,
            resumption=resumption,
            signals=signals,
            token_weighting=seq.token_weighting,
        )
    if signals.checkpoint is not None:
        signals.leave(fabric)  # exit 143 (SIGTERM) / 130 (SIGINT): the step directory is the result, no final/
    fabric.print(
        litgpt_utils.create_finetuning_performance_report(
            time.perf_counter() - started, token_counts, fabric.device.type
        )
    )
    report["batches"] = seq_data.batches_trained(token_counts, train.micro_batch_size, seq.group_by_length, seq.pack)
    report["batches"]["loss_weighting"] = "token" if seq.token_weighting else "batch"
    seq_data.write_report(fabric, out_dir, report)

    if eval.final_validation:
        val_loss = validate(fabric, model, val_loader, dataclasses.replace(eval, max_iters=len(val_loader)))
        fabric.log_dict({"val_loss": val_loss, "val_ppl": math.exp(val_loss)})
        fabric.print(f"Final evaluation | val loss: {val_loss.item():.3f} | val ppl: {math.exp(val_loss):.3f}")

    save(fabric, model, out_dir / "final")
    if fabric.global_rank == 0:
        merge_lora(checkpoint_dir=out_dir / "final", pretrained_checkpoint_dir=checkpoint_dir, precision=precision)
    fabric.barrier()
    fabric.print(decision.summary())


def fit(
    fabric: L.Fabric,
    *,
    model: GPT,
    optimizer: torch.optim.Optimizer,
    scheduler,
    train_loader,
    val_loader,
    data: DataModule,
    tokenizer: Tokenizer,
    out_dir: Path,
    train: TrainArgs,
    eval: EvalArgs,
    save: Callable,
    verify: bool = True,
    resumption: resume_state.Resumption,
    signals: resume_state.GracefulStop | None = None,
    token_weighting: bool = False,
) -> dict:
    """The training loop. max_seq_length was settled before the model was built; nothing here changes it.

    ``save(fabric, model, directory)`` writes a checkpoint. ``verify``: without an initial validation, run two val
    batches first as upstream does (not needed after a rehearsal). They run with the RNG states put back, as the
    rehearsal's are, so both runs train alike. ``token_weighting``: every supervised token of a step weighs the same
    (``token_loss.StepLookahead`` counts the step's tokens first). ``resumption``: the checkpoint to go on from (its
    state is put back after the initial validation) and what every checkpoint records; ``signals``: SIGTERM or
    SIGINT ends the loop after the optimizer step it arrives in, with a checkpoint (``signals.checkpoint``).
    Returns the run's token counts, summed over the ranks.
    """
    if eval.initial_validation:
        val_loss = f"{validate(fabric, model, val_loader, dataclasses.replace(eval, max_iters=len(val_loader))):.3f}"
    else:
        if verify:
            fabric.print("Verifying settings ...")
            with rehearsal.preserved_rng():
                validate(fabric, model, val_loader, dataclasses.replace(eval, max_iters=2), verbose=False)
        val_loss = "n/a"

    accumulation = train.gradient_accumulation_iters(fabric.world_size, 1)
    batches = resume_state.EpochBatches(train_loader)
    if token_weighting:
        batches = StepLookahead(batches, accumulation, fabric)
    throughput = ThroughputMonitor(fabric, window_size=50)
    running_loss = RunningMean(window=accumulation, sync_on_compute=False).to(fabric.device)
    max_steps = train.max_steps or float("inf")
    max_time = train.max_time or float("inf")
    counts = {
        key: torch.tensor(0, device=fabric.device, dtype=torch.long)
        for key in ("raw", "template", "padded", "rows", "samples")
    }
    step = iteration = 0
    trained_before = 0.0  # seconds, by the run that saved the checkpoint (--train.max_time counts the whole run)
    if resumption.step_dir is not None:
        step, iteration, trained_before = resumption.restore(
            fabric, batches, optimizer, scheduler, running_loss, counts
        )
    started = time.perf_counter() - trained_before

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
            iteration -= 1  # that batch was not trained on
            break

        accumulating = iteration % accumulation != 0
        with fabric.no_backward_sync(model, enabled=accumulating):
            loss = train_loss(model, batch, batches.tokens_per_micro_batch if token_weighting else None)
            fabric.backward(loss / accumulation)
        running_loss.update(loss.detach())
        if not accumulating:
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            step += 1

        counts["raw"] += batch["token_counts"]["raw"].sum().item()
        counts["template"] += batch["token_counts"]["raw_plus_prompt_template"].sum().item()
        counts["padded"] += batch["input_ids"].numel()
        counts["rows"] += batch["input_ids"].size(0)
        counts["samples"] += batch["token_counts"]["raw"].numel()

        if iteration % train.log_interval == 0:
            now = time.perf_counter()
            throughput.update(
                time=now - started,
                batches=iteration,
                samples=counts["samples"].item(),
                lengths=counts["padded"].item(),
            )
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

        if accumulating:
            continue
        stopping = signals is not None and signals.requested_on_any_rank(fabric)
        if stopping or (train.save_interval is not None and step % train.save_interval == 0):
            step_dir = out_dir / f"step-{step:06d}"
            resumption.save(
                fabric,
                step_dir,
                partial(save, fabric, model),
                step=step,
                iteration=iteration,
                batches=batches,
                elapsed_seconds=time.perf_counter() - started,
                optimizer=optimizer,
                scheduler=scheduler,
                running_loss=running_loss,
                token_counts=counts,
            )
        if stopping:
            signals.checkpoint = step_dir
            fabric.print(f"Stopped at step {step}. To resume: {resume_state.resume_command(sys.argv, step_dir)}")
            break

    totals = {key: fabric.all_reduce(value, reduce_op="sum").item() for key, value in counts.items()}
    return {
        "raw_tokens": totals["raw"],
        "raw_tokens_plus_prompt_template": totals["template"],
        "raw_tokens_plus_prompt_template_and_padding": totals["padded"],
        "micro_batches": iteration * fabric.world_size,
        "rows": totals["rows"],
        "samples": totals["samples"],
    }


def periodic_validation(
    fabric: L.Fabric,
    model,
    val_loader: DataLoader,
    eval: EvalArgs,
    tokenizer: Tokenizer,
    data: DataModule,
    iteration: int,
) -> str:
    """Validation during training: the val loss averaged over the ranks, printed and logged, and (on rank 0) an
    example generated from the model. Returns the loss as the progress lines show it."""
    started = time.perf_counter()
    rank_loss = validate(fabric, model, val_loader, eval)
    if fabric.global_rank == 0:
        generate_example(fabric, model, tokenizer, eval, data)
    loss = fabric.all_reduce(rank_loss.to(fabric.device), reduce_op="mean")  # a collective: every rank waits here
    fabric.print(
        f"iter {iteration}: val loss {loss.item():.4f}, val time: {(time.perf_counter() - started) * 1000:.2f} ms"
    )
    fabric.log_dict({"val_loss": loss, "val_ppl": math.exp(loss)}, step=iteration)
    return f"{loss.item():.3f}"


def save_checkpoint(
    fabric: L.Fabric, model, directory: Path, *, checkpoint_dir: Path, data: DataModule, hyperparameters: Namespace
) -> None:
    """LoRA weights, config files, prompt style and hyperparameters, as upstream lays them out."""
    directory.mkdir(parents=True, exist_ok=True)
    save_lora_checkpoint(fabric, model, directory / "lit_model.pth.lora")
    if fabric.global_rank == 0:
        litgpt_utils.copy_config_files(checkpoint_dir, directory)
        build_parser().save(hyperparameters, directory / "hyperparameters.yaml", overwrite=True)
        save_prompt_style(data.prompt_style, directory)
    fabric.barrier()


def swap_in_stable_embedding(model) -> None:
    """bitsandbytes' 8-bit optimizers want a StableEmbedding in place of the token embedding."""
    from bitsandbytes.nn import StableEmbedding

    old = model.transformer.wte
    new = StableEmbedding(old.num_embeddings, old.embedding_dim)
    with torch.no_grad():
        new.weight.copy_(old.weight)
    model.transformer.wte = new.to(device=old.weight.device, dtype=old.weight.dtype)


def build_parser() -> FlowParser:
    """The command line: litgpt finetune_lora's own flags, defaults and help (read from its function), plus --seq.*.
    ``FlowParser`` checks the data paths before the data module is built, and says what --train.max_seq_length and
    --train.lr_warmup_steps mean here (``cli_support.HELP``)."""
    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # help text from the dataclasses' docstrings
    parser = FlowParser(default_meta=False, description=setup.__doc__.partition("\n")[0])
    parser.add_argument("--config", action=ActionConfigFile, help="Path to a configuration file (yaml).")
    parser.add_function_arguments(litgpt_finetune_lora, as_group=False, as_positional=True, sub_configs=True)
    parser.add_class_arguments(SeqArgs, "seq", sub_configs=True)
    not_resume = set(inspect.signature(litgpt_finetune_full).parameters) - {"resume"}
    parser.add_function_arguments(litgpt_finetune_full, as_group=False, skip=not_resume)  # --resume, as upstream's
    cli_support.use_flow_help(parser)
    return parser


def captured_hyperparameters() -> Namespace:
    """The command line as parsed, to be written to each checkpoint's hyperparameters.yaml (as upstream does)."""
    return build_parser().parse_args(sys.argv[1:])


def cli() -> None:
    torch.set_float32_matmul_precision("high")
    warnings.filterwarnings(
        "ignore", message=r"The epoch parameter in `scheduler.step\(\)` was not necessary", category=UserWarning
    )
    with cli_support.user_facing_exits():  # bad input: `error: ...`, exit 2; Ctrl-C: one line, exit 130
        parser = build_parser()
        flags = parser.instantiate_classes(parser.parse_args())
        flags.pop("config", None)
        setup(**flags)


if __name__ == "__main__":
    cli()
