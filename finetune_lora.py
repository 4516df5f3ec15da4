"""Fine-tuning with litgpt (LoRA, adapter, adapter v2, full) that decides max_seq_length from all the data, before
the model exists.

A drop-in for ``litgpt finetune_lora`` (and, with the command word, ``finetune_adapter``, ``finetune_adapter_v2``,
``finetune_full``): same flags and outputs, plus ``--seq.*`` and ``--resume``. The path is straight:

    parse -> tokenizer + data -> scan lengths -> decide max_seq_length -> apply the over-length policy, plan the cuts
          + report -> build GPT, load weights -> rehearse -> fit -> validate -> save

Everything before "build GPT" needs only the tokenizer and the data. This file is the flow, written once for every
method; what differs between methods is in ``litgpt_seqlen.methods``; ``data_utils`` holds the length logic over
plain values, the package ``litgpt_seqlen`` the parts, one room per job.
"""

import dataclasses
import inspect
import math
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from jsonargparse import Namespace
from lightning.fabric.plugins import BitsandbytesPrecision
from lightning.fabric.utilities import ThroughputMonitor
from litgpt import utils as litgpt_utils
from litgpt.args import EvalArgs, TrainArgs
from litgpt.config import Config
from litgpt.data import Alpaca, DataModule
from litgpt.tokenizer import Tokenizer
from litgpt.utils import load_checkpoint  # a module-level name: litgpt's own tests patch it here

from litgpt_seqlen import devices as devices_and_precision
from litgpt_seqlen import ranks
from litgpt_seqlen.args import Resume, SeqArgs, parse_resume
from litgpt_seqlen.checkpoint import lookup, same_run
from litgpt_seqlen.checkpoint import state as training_state
from litgpt_seqlen.checkpoint.checkpointer import Checkpointer
from litgpt_seqlen.cli.hyperparameters import SEQ_CONFIG, write_seq_config
from litgpt_seqlen.cli.parser import build_parser, split_command
from litgpt_seqlen.cli.resume_command import resume_command
from litgpt_seqlen.data import files, loaders, order
from litgpt_seqlen.data.length_plan import plan_lengths
from litgpt_seqlen.errors import UserInputError
from litgpt_seqlen.exits.graceful_stop import GracefulStop
from litgpt_seqlen.exits.user_facing import user_facing_exits
from litgpt_seqlen.memory import search as memory_search
from litgpt_seqlen.methods import Method, method_named
from litgpt_seqlen.model import packed_attention
from litgpt_seqlen.model.base import check_tokenizer, find_checkpoint_dir, load_config, swap_in_stable_embedding
from litgpt_seqlen.model.packed_forward import check_packable, packed_gpt
from litgpt_seqlen.model.sharded import load_full_weights_file
from litgpt_seqlen.out_dir.earlier_runs import begin_training
from litgpt_seqlen.out_dir.lock import hold_out_dir
from litgpt_seqlen.report import build as report_build
from litgpt_seqlen.report.outcomes import plan_warnings
from litgpt_seqlen.settings import checks as settings
from litgpt_seqlen.training import evaluation
from litgpt_seqlen.training.loss import FiniteLossWatch, StepLookahead, train_loss
from litgpt_seqlen.training.progress import count_tokens, log_progress, performance_report
from litgpt_seqlen.training.rng import restore_rng
from litgpt_seqlen.training.schedule import Steps, get_lr_scheduler, replanned_schedule


def setup(
    checkpoint_dir: Path, seq: SeqArgs = SeqArgs(), resume: Resume = False, *, method: str = "lora", **litgpt_flags
) -> None:
    """Fine-tune a model (``method``: lora, adapter, adapter_v2 or full), with max_seq_length decided from train, val
    (and test) before the model is built.

    ``litgpt_flags`` are the keyword flags of litgpt's own script for the method (``finetune_lora``: ``out_dir``,
    ``precision``, ``train``, ``eval``, ``lora_r``, ...), with its defaults; ``seq`` holds the flags this entry point
    adds; ``resume`` is litgpt ``finetune_full``'s: a ``step-*`` directory, ``True`` (the newest complete checkpoint in
    ``out_dir``, an error when there is none), ``"auto"`` (the same, but start fresh when there is none) or ``False``.
    """
    method, resume = method_named(method), parse_resume(resume)
    try:
        flags = inspect.signature(method.upstream.setup).bind(checkpoint_dir, **litgpt_flags)
    except TypeError as problem:
        raise UserInputError(f"{problem} (setup takes litgpt {method.command}'s flags plus seq).") from None
    flags.apply_defaults()
    flags = flags.arguments
    train, eval, seed = flags["train"], flags["eval"], flags["seed"]
    devices, num_nodes = litgpt_utils.parse_devices(flags["devices"]), flags["num_nodes"]
    precision = flags["precision"] or litgpt_utils.get_default_supported_precision(training=True)
    quantize = flags.get("quantize")  # finetune_full has no --quantize
    out_dir = litgpt_utils.init_out_dir(Path(flags["out_dir"]))
    # Every setting, upstream's included, before anything is read or built; out_dir is created and tried for writing.
    settings.check_settings(method, train, eval, seq, devices, num_nodes, quantize, precision, out_dir, flags)
    with hold_out_dir(out_dir, enabled=ranks.launched_as_rank_zero()):  # one run per out_dir, for its life
        data = flags["data"] or Alpaca()
        located = files.check_data_files(data)  # every sample of the user's files, before a token is made
        checkpoint_dir = find_checkpoint_dir(Path(checkpoint_dir), flags["access_token"], need_weights=not seq.dry_run)
        config = load_config(checkpoint_dir, method.config_class, **{name: flags[name] for name in method.config_flags})
        check_tokenizer(checkpoint_dir, config, Tokenizer)  # it loads, and its ids fit the model's vocabulary
        method.check_trainable(config)
        if seq.pack:
            check_packable(config, method.block_class)  # from the config alone: before any weight is read
        logger = litgpt_utils.choose_logger(
            flags["logger_name"],
            out_dir,
            name=f"finetune-{config.name}",
            log_interval=train.log_interval,
            log_args=dataclasses.asdict(flags["log"]),
            resume=bool(resume),
        )

        plugins, precision = devices_and_precision.precision_plugins(quantize, precision)
        strategy = devices_and_precision.strategy_for(devices, num_nodes)
        with devices_and_precision.quiet_for(seq.dry_run):
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
            method=method,
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


def main(
    fabric: L.Fabric,
    method: Method,
    config: Config,
    data: DataModule,
    located: files.DataFiles | None,
    checkpoint_dir: Path,
    out_dir: Path,
    train: TrainArgs,
    eval: EvalArgs,
    seq: SeqArgs,
    optimizer: str | dict,
    precision: str | None,
    seed: int,
    resume: Resume = False,
) -> None:
    # 1. Lengths, from the tokenizer and the data only: scan, decide, apply the policy, plan the cuts and the batch
    #    order, count the steps, report. On resume, the checkpoint must be of this model, data, flags and decision.
    hyperparameters = captured_hyperparameters(method)
    resume_from = lookup.find_checkpoint(out_dir, resume, log=fabric.print)
    if resume_from is not None:
        same_run.check_same_model(resume_from, checkpoint_dir)
    tokenizer = Tokenizer(checkpoint_dir)
    plan = plan_lengths(fabric, data, tokenizer, train, seq, config.block_size, located)
    run = same_run.run_flags(method, train, seq, seed, fabric.world_size, optimizer, precision, config, data)
    resumption, plan = same_run.begin(
        fabric, out_dir, resume_from, plan, run, saves=not seq.dry_run, base=checkpoint_dir
    )
    train = resumption.trained_micro_batch(train)  # a checkpoint goes on at its size (the memory search's choice)
    max_seq_length, batches_for_epoch = plan.decision.max_seq_length, order.for_run(fabric, plan, train, seq, seed)
    accumulation = train.gradient_accumulation_iters(fabric.world_size, 1)
    steps = Steps.count(len(batches_for_epoch(0)), accumulation, train.epochs, train.max_steps)  # the one count
    resumption.check_run_length(steps.total, log=fabric.print)  # going on for more steps is allowed
    if resumption.finished(steps.total, out_dir / "final", method, log=fabric.print):
        return  # the run's files as they are
    found = plan_warnings(plan, data, tokenizer, seq.over_length) + settings.check_run(train, eval, plan.kept, steps)
    report = report_build.publish_plan(fabric, out_dir, plan, seq, train, seed, found, resumption.report())
    if seq.dry_run:
        fabric.print("dry run: nothing trained (--seq.dry_run true).")
        return
    hyperparameters.train.max_seq_length = max_seq_length  # what the model trains with, for a rerun
    if fabric.global_rank == 0:
        begin_training(out_dir, resumed=resume_from is not None, log=fabric.print)
        write_seq_config(out_dir / SEQ_CONFIG, hyperparameters)  # beside upstream's hyperparameters.yaml

    # 2. The loaders the plan allows; then the model, built with the decided length, its weights and its state.
    train_loader, val_loader = loaders.make_loaders(fabric, data, plan, batches_for_epoch, seed, pack=seq.pack)
    fabric.seed_everything(seed)  # the same on every rank, for model init
    attention = packed_attention.choose_for_run(fabric, config, precision) if seq.pack else None
    state = build_training_state(
        fabric, method, config, max_seq_length, checkpoint_dir, optimizer, train, steps, attention, resumption
    )

    # 3. Rehearse the worst case (the longest micro-batches) at the largest micro-batch that fits; train, validate, save.
    if seq.rehearse:
        train, train_loader, val_loader = rehearse(
            fabric, state, (train_loader, val_loader), data, plan, train, seq, seed, report
        )
    checkpointer = Checkpointer(
        fabric, out_dir, method, checkpoint_dir, data.prompt_style, hyperparameters, resumption.header_parts
    )
    started = time.perf_counter()
    with GracefulStop(log=fabric.print) as signals:
        micro_batches = fit(
            fabric, state, train_loader, val_loader, data, tokenizer, train, eval, seq, checkpointer, signals
        )
    if signals.checkpoint is not None:
        signals.leave(fabric)  # exit 143 (SIGTERM) / 130 (SIGINT): the step directory is the result, no final/
    counts = performance_report(fabric, state["token_counts"], started)
    report.batches = report_build.batches_trained(counts, micro_batches, train.micro_batch_size, seq, attention)
    report.write(fabric)
    evaluation.final_validation(fabric, state["model"], val_loader, eval)
    checkpointer.save_final(state["model"], precision)
    fabric.print(plan.decision.summary())


def rehearse(
    fabric: L.Fabric, state: dict, run_loaders: tuple, data, plan, train: TrainArgs, seq: SeqArgs, seed: int, report
):
    """The rehearsal, at the largest micro-batch size that fits (``memory.search``), reported. Returns ``train`` and
    the loaders at that size: new ones when it is smaller than ``train.micro_batch_size``."""
    fitted = memory_search.rehearse_run(fabric, state, dict(zip(("train", "val"), run_loaders)), plan, train, seq)
    report.rehearsal, report.memory = fitted.rehearsal, fitted.report
    report.write(fabric)
    if fitted.micro_batch_size == train.micro_batch_size:
        return (train, *run_loaders)
    train = dataclasses.replace(train, micro_batch_size=fitted.micro_batch_size)  # the same samples per step
    run_loaders = loaders.make_loaders(
        fabric, data, plan, order.for_run(fabric, plan, train, seq, seed), seed, seq.pack, train.micro_batch_size
    )
    return (train, *run_loaders)


def build_training_state(
    fabric,
    method: Method,
    config,
    max_seq_length,
    checkpoint_dir,
    optimizer,
    train,
    steps: Steps,
    attention,
    resumption,
) -> dict:
    """The method's model, built with the decided length and its base weights, its optimizer and schedule: fit's
    state, loaded from the checkpoint ``resumption`` goes on from (if any). ``attention``: the path packed rows take
    (``packed_attention.choose_attention``)."""
    with fabric.init_module(empty_init=(fabric.world_size > 1)):
        model = packed_gpt(method.gpt_class)(config, attention)
    model.max_seq_length = max_seq_length
    method.prepare(model)
    method.mark_trainable(model)
    fabric.print(f"Number of trainable parameters: {litgpt_utils.num_parameters(model, requires_grad=True):,}")
    fabric.print(f"Number of non-trainable parameters: {litgpt_utils.num_parameters(model, requires_grad=False):,}")
    model = fabric.setup_module(model)
    # The weights before the optimizer: loading a sharded model may put new parameter objects in place.
    # litgpt's loader on one device; on several, torch's state-dict API (litgpt's there knows LoRA's layers only)
    load_base = load_checkpoint if fabric.world_size == 1 else load_full_weights_file
    load_base(fabric, model, checkpoint_dir / "lit_model.pth", strict=method.strict_base_load)
    if isinstance(fabric.strategy.precision, BitsandbytesPrecision):
        optimizer = litgpt_utils.instantiate_bnb_optimizer(optimizer, model.parameters())
        swap_in_stable_embedding(model)
    else:
        optimizer = litgpt_utils.instantiate_torch_optimizer(optimizer, model.parameters())
    optimizer = fabric.setup_optimizers(optimizer)
    scheduler = get_lr_scheduler(optimizer, warmup_steps=train.lr_warmup_steps, max_steps=steps.total)
    state = training_state.new_state(model, optimizer, scheduler, steps.accumulation, fabric.device)
    if resumption.step_dir is not None:
        training_state.load(fabric, resumption.step_dir, state)
        if resumption.length_changed():  # the schedule of a run planned for the new length, from this step on
            state["scheduler"] = replanned_schedule(optimizer, train.lr_warmup_steps, steps.total, state["step"])
    return state


def fit(
    fabric: L.Fabric,
    state: dict,
    train_loader,
    val_loader,
    data: DataModule,
    tokenizer: Tokenizer,
    train: TrainArgs,
    eval: EvalArgs,
    seq: SeqArgs,
    checkpointer: Checkpointer,
    signals: GracefulStop | None = None,
) -> int:
    """The training loop over ``state`` (``checkpoint.state.new_state``; a loaded one goes on where it stopped).
    max_seq_length was settled before the model was built; nothing here changes it.

    ``checkpointer.save(state)`` writes a resumable checkpoint. Without an initial validation or a rehearsal
    (``seq.rehearse``), two val batches run first, as upstream does. ``seq.token_weighting``: every supervised token of
    a step weighs the same (``StepLookahead`` counts the step's tokens first). ``signals``: SIGTERM or SIGINT ends the
    loop after the optimizer step it arrives in, with a checkpoint (``signals.checkpoint``). Returns the micro-batches
    trained, over all ranks.
    """
    model, optimizer, scheduler = state["model"], state["optimizer"], state["scheduler"]
    token_weighting = seq.token_weighting
    val_loss = evaluation.initial_validation(fabric, model, val_loader, eval, verify=not seq.rehearse)
    saved_step = None
    if state["rng"] is not None:  # a resumed run draws what the saved run would have drawn next
        restore_rng(state["rng"])
        saved_step = state["step"]
        fabric.print(
            f"Resumed at step {state['step']} (epoch {state['epoch'] + 1}, {state['position']} micro-batches in; none"
            " re-read)"
        )
        fabric.log_dict({"resumed_from_step": state["step"]}, step=state["iteration"])

    accumulation = train.gradient_accumulation_iters(fabric.world_size, 1)
    batches = epoch_batches = order.EpochBatches(train_loader, epoch=state["epoch"], position=state["position"])
    if token_weighting:
        batches = StepLookahead(epoch_batches, accumulation, fabric)
    throughput = ThroughputMonitor(fabric, window_size=50)
    running_loss, counts, finite = state["running_loss"], state["token_counts"], FiniteLossWatch(fabric.device)
    max_steps, max_time = train.max_steps or float("inf"), train.max_time or float("inf")
    poll_every = 1 if fabric.world_size == 1 else max(1, math.ceil(train.log_interval / accumulation))
    started = time.perf_counter() - state["elapsed_seconds"]  # --train.max_time counts the whole run

    def save() -> int:
        state["epoch"], state["position"] = batches.epoch, batches.position
        state["elapsed_seconds"] = time.perf_counter() - started
        checkpointer.save(state)
        return state["step"]

    while state["step"] < max_steps:
        state["iteration"] += 1
        iteration, iteration_started = state["iteration"], time.perf_counter()
        batch = next(batches)
        stop = None
        if batches.epoch >= train.epochs:
            stop = f"Number of epochs {train.epochs} reached, stopping training..."
        elif iteration_started - started > max_time:
            stop = f"Max time ({max_time / 60.0:.2f}m) reached, stopping training..."
        if stop:
            evaluation.generate_everywhere(fabric, model, tokenizer, eval, data)
            fabric.print(stop)
            state["iteration"] -= 1  # that batch was not trained on
            break

        accumulating = iteration % accumulation != 0
        with fabric.no_backward_sync(model, enabled=accumulating):
            loss = train_loss(model, batch, batches.tokens_per_micro_batch if token_weighting else None)
            fabric.backward(loss / accumulation)
        running_loss.update(loss)
        finite.update(loss, state["step"] + 1)
        if not accumulating:
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            state["step"] += 1
        count_tokens(counts, batch)

        if iteration % train.log_interval == 0:
            finite.check(fabric)  # the progress line waits for the device anyway
            log_progress(fabric, state, batches.epoch, iteration_started, started, throughput, val_loss, accumulating)
        if accumulating:
            continue
        step = state["step"]
        if step % eval.interval == 0:
            val_loss = evaluation.periodic_validation(fabric, model, val_loader, eval, tokenizer, data, iteration)
        stopping = signals is not None and step % poll_every == 0 and signals.requested_on_any_rank(fabric)
        if stopping or (train.save_interval is not None and step % train.save_interval == 0):
            finite.check(fabric, model, step)
            saved_step = save()
        if stopping:
            signals.checkpoint = checkpointer.step_dir(step)
            fabric.print(f"Stopped at step {step}. To resume: {resume_command(sys.argv, signals.checkpoint)}")
            break
    epoch_batches.close()  # its loader's worker processes, now
    finite.check(fabric, model, state["step"])
    if saved_step != state["step"]:  # the trained weights, resumable, before anything that can fail or be interrupted
        save()
    return state["iteration"] * fabric.world_size


def captured_hyperparameters(method: Method) -> Namespace:
    """The command line as parsed, to be written to each checkpoint's hyperparameters.yaml (as upstream does)."""
    return build_parser(method).parse_args(split_command(sys.argv[1:])[1])


def cli() -> None:
    torch.set_float32_matmul_precision("high")
    warnings.filterwarnings(
        "ignore", message=r"The epoch parameter in `scheduler.step\(\)` was not necessary", category=UserWarning
    )
    # torch's guess from this machine's CPU count, on every loader made (a dry run makes them and reads none)
    warnings.filterwarnings("ignore", message=r"This DataLoader will create \d+ worker processes", category=UserWarning)
    with user_facing_exits():  # bad input: `error: ...`, exit 2; Ctrl-C: one line, exit 130
        method, args = split_command(sys.argv[1:])  # `litgpt-seqlen finetune_adapter ...`; none: LoRA
        flow_parser = build_parser(method)
        flags = flow_parser.instantiate_classes(flow_parser.parse_args(args))
        flags.pop("config", None)
        setup(method=method.name, **flags)


if __name__ == "__main__":
    cli()
