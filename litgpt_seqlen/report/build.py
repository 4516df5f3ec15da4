"""seq_lengths.json: what was scanned, decided and trained, one part per stage, always written whole (beside, then
renamed: a full disk leaves the previous version, never half a file)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
from litgpt.args import TrainArgs

import data_utils
from litgpt_seqlen.args import SeqArgs
from litgpt_seqlen.checkpoint.atomic import write_file_atomically
from litgpt_seqlen.data import order, truncation
from litgpt_seqlen.data.length_plan import LengthPlan
from litgpt_seqlen.out_dir import earlier_runs
from litgpt_seqlen.report.outcomes import warning_lines
from litgpt_seqlen.report.picture import log_length_histograms, write_length_picture
from litgpt_seqlen.report.printed import print_report


@dataclass
class RunReport:
    """The report's parts: the plan (written before the model exists), then each stage's own key."""

    path: Path  # seq_lengths.json, or seq_lengths.dry_run.json beside a trained run
    plan: dict
    resumed_from: dict | None = None
    rehearsal: dict | None = None
    memory: dict | None = None
    batches: dict | None = None

    def as_dict(self) -> dict:
        stages = {
            "resumed_from": self.resumed_from,
            "rehearsal": self.rehearsal,
            "memory": self.memory,
            "batches": self.batches,
        }
        return {**self.plan, **{key: value for key, value in stages.items() if value is not None}}

    def write(self, fabric: L.Fabric) -> None:
        if fabric.global_rank == 0:
            text = json.dumps(self.as_dict(), indent=2) + "\n"
            write_file_atomically(self.path, lambda file: file.write(text.encode()))


def publish_plan(
    fabric: L.Fabric,
    out_dir: Path,
    plan: LengthPlan,
    seq: SeqArgs,
    train: TrainArgs,
    seed: int,
    warnings: Sequence[dict] = (),
    resumed_from: dict | None = None,
) -> RunReport:
    """Print the decision and the warnings, write seq_lengths.json (and dropped_samples.jsonl, under drop or when a
    sample has no target), log the key figures. Files an earlier run left that this run does not rewrite are removed
    first; a dry run into an out_dir with a trained run writes its own files beside it (``out_dir.earlier_runs.report_files``).
    ``train``: the micro-batch size and the optimizer step, as the train order takes them."""
    decision = plan.decision
    if decision.capped and decision.source == "override":
        fabric.print(
            f"warning: --train.max_seq_length {decision.wanted} is above the model's block_size {decision.block_size}; using {decision.block_size}."
        )
    content = build_report(plan, seq, train, fabric.world_size, seed, warnings)
    report = RunReport(out_dir / earlier_runs.REPORT, content, resumed_from=resumed_from)
    if fabric.global_rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        dropped = plan.dropped_rows()
        leaves_out = data_utils.OVER_LENGTH[seq.over_length].leaves_out
        files = earlier_runs.report_files(out_dir, dry_run=seq.dry_run, drop=leaves_out or bool(dropped))
        if files.dropped is not None:
            write_dropped(files.dropped, dropped, source=plan.located.source if plan.located else None)
        report.path = files.report  # the files first: a reader that goes away mid-print leaves them whole
        report.write(fabric)
        picture = files.report.with_suffix(".png")  # seq_lengths.png, or seq_lengths.dry_run.png
        hint = write_length_picture(
            picture, plan.lengths, decision.max_seq_length, decision.block_size, content["what_if"]
        )
        print_report(fabric, content, plan)
        for line in warning_lines(warnings):
            fabric.print(line)
        for line in (files.note, hint and f"note: {hint}"):
            if line:
                fabric.print(line)
    fabric.log_dict(key_figures(content), step=0)
    log_length_histograms(fabric, plan.lengths)
    return report


def build_report(
    plan: LengthPlan, seq: SeqArgs, train: TrainArgs, world_size: int, seed: int, warnings: Sequence[dict]
) -> dict:
    """Every key of the plan's part of seq_lengths.json (the stages add theirs: ``RunReport``)."""
    decision = plan.decision
    splits = {}
    for name, split_lengths in plan.lengths.items():
        splits[name] = data_utils.split_stats(split_lengths, decision.max_seq_length)
        reasons = list(plan.dropped[name].values())
        if data_utils.OVER_LENGTH[seq.over_length].leaves_out:
            splits[name]["dropped"] = reasons.count("over_length")
            splits[name]["tokens_truncated"] = 0
        seen = [plan.cuts[name][i] for i in plan.kept[name]]
        splits[name].update(truncation.truncation_stats(seen, reasons.count("unsupervised")))
    every_length = [n for split_lengths in plan.lengths.values() for n in split_lengths]
    every_parts = [p for split_parts in plan.parts.values() for p in split_parts]
    what_if = data_utils.what_if(every_length, decision.block_size, chosen=decision.max_seq_length)
    micro_batch_size, accumulation = train.micro_batch_size, train.gradient_accumulation_iters(world_size, 1)
    sizes = {"world_size": world_size, "step_size": micro_batch_size * accumulation}
    expected = order.expected_efficiency(
        plan.kept_lengths("train"), decision.max_seq_length, micro_batch_size, seed, **sizes
    )
    return {
        "max_seq_length": decision.max_seq_length,
        "source": decision.source,
        "longest": decision.longest,
        "longest_split": decision.longest_split,
        "headroom": decision.headroom,
        "block_size": decision.block_size,
        "capped": decision.capped,
        "over_length": seq.over_length,
        "truncate_from": seq.truncate_from,
        "summary": decision.summary(),
        "splits": splits,
        "what_if": truncation.add_response_cut(what_if, every_parts, seq.truncate_from),
        "expected_efficiency": {how: estimate["efficiency"] for how, estimate in expected.items()},
        "batches_estimate": {
            "packed": False,
            **expected[seq.order],
            "micro_batch_size": micro_batch_size,
            "group_by_length": seq.group_by_length,
        },
        "warnings": list(warnings),
        "dry_run": seq.dry_run,
    }


def key_figures(report: dict) -> dict:
    figures = {"seq/longest": report["longest"], "seq/max_seq_length": report["max_seq_length"]}
    for name, stats in report["splits"].items():
        for key in ("p50", "p99", "max", "over_limit", "response_tokens_cut", "unsupervised_dropped"):
            if stats[key] is not None:
                figures[f"seq/{name}_{key}"] = stats[key]
    return figures


def batches_trained(
    token_counts: dict, micro_batches: int, micro_batch_size: int, seq: SeqArgs, attention: str | None = None
) -> dict:
    """The padding of the whole run, from fit's exact counts (summed over the ranks). A row is one sample unpacked.
    ``attention``: the path packed rows took (``model.packed_attention``), None unpacked."""
    real, processed = (
        token_counts["raw_tokens_plus_prompt_template"],
        token_counts["raw_tokens_plus_prompt_template_and_padding"],
    )
    rows, samples = token_counts["rows"], token_counts["samples"]
    return {
        "count": micro_batches,
        "packed": seq.pack,
        "rows": rows,
        "samples": samples,
        "samples_per_row": round(samples / rows, 3) if rows else 0.0,
        "real_tokens": real,
        "padded_tokens": processed,
        "efficiency": round(real / processed, 6) if processed else 1.0,
        "micro_batch_size": micro_batch_size,
        "group_by_length": seq.group_by_length,
        "loss_weighting": "token" if seq.token_weighting else "batch",
        "attention": attention,
    }


def write_dropped(path: Path, dropped: Sequence[tuple[str, int, int, str, object]], source=None) -> None:
    """One JSON line per dropped sample: its split, index, length, the reason (``over_length`` under
    ``--seq.over_length drop``, ``unsupervised`` when cutting left no token to learn from), with ``source(split,
    index)`` the file and position it came from (``DataFiles.source``), and the sample, unchanged."""

    def write(file) -> None:
        for split, index, length, reason, sample in dropped:
            record = {"split": split, "index": index, "length": length, "reason": reason}
            record.update(source(split, index) if source else {})
            file.write((json.dumps({**record, "sample": sample}, ensure_ascii=False) + "\n").encode())

    write_file_atomically(path, write)
