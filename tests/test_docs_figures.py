"""The figures of README.md and docs/ against the program: each number a page gives for what the program computes or
prints is read from the page and computed again here by the project's own functions, so the test fails when either
side drifts. Unit-level only (no command-line run, well under a second in all).

Figures that come from a run live beside the run that makes them: the docs' own commands in tests/test_readme.py
(the what-if table, the resume lines, the checkpoint sizes). Benchmark timings are not tested: each page names the
command and the machine that produced them."""

import base64
import hashlib
import inspect
import json
import re
from pathlib import Path

import pytest

import assets
import data_utils
from helpers import SHARED, requires_shared
from litgpt_seqlen.checkpoint.layout import SAMPLE_BLOCK, SAMPLED_BLOCKS, sampled_offsets
from litgpt_seqlen.checkpoint.same_run import SAMPLE_DIGEST, content_fingerprint, data_fingerprint
from litgpt_seqlen.data import order, packing
from litgpt_seqlen.data.truncation import plan
from litgpt_seqlen.training.schedule import check_schedule

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DEMO_BLOCK_SIZE = 2048  # assets.build_demo's default
DEMO_SEED = 1337  # litgpt's default --seed, which the docs' demo commands keep


def page_text(name: str) -> str:
    return (ROOT / name).read_text(encoding="utf-8")


def figure(name: str, pattern: str) -> str | tuple[str, ...]:
    """The group(s) of the one match of ``pattern`` (anchored on the words around the figure) in page ``name``."""
    found = re.findall(pattern, page_text(name))
    assert len(found) == 1, f"{name}: expected one match of {pattern!r}, found {len(found)}"
    return found[0]


def number(text: str) -> float:
    return float(text.replace(",", ""))


def demo_lengths() -> dict[str, list[int]]:
    """The demo data's token lengths: assets.build_data gives every sample exactly its length."""
    train, val = assets.demo_lengths()
    return {"train": train, "val": val}


# ---------------------------------------------------------------------------------------------------------------
# The decision line
# ---------------------------------------------------------------------------------------------------------------

DECISION_LINE = r"max_seq_length = \d+ \([^)\n]*\)"


@pytest.mark.parametrize("page", ["README.md", "docs/report.md"])
def test_the_demo_decision_line_of_the_page_is_the_one_the_demo_data_gives(page):
    printed = data_utils.decide_max_seq_length(demo_lengths(), DEMO_BLOCK_SIZE).summary()
    assert figure(page, r"(max_seq_length = \d+ \(longest[^)\n]*\))") == printed


def test_length_page_decision_lines_are_what_decide_prints_for_their_figures():
    """docs/length.md's three example lines: the demo data's, an override, and a cap at block_size."""
    block = figure("docs/length.md", r"(?s)printed report says what was decided and why:\n\n```\n(.*?)```")
    lines = block.splitlines()
    assert len(lines) == 3 and all(re.fullmatch(DECISION_LINE, line) for line in lines)
    auto, override, capped = lines
    assert auto == data_utils.decide_max_seq_length(demo_lengths(), DEMO_BLOCK_SIZE).summary()
    wanted = int(re.search(r"--train.max_seq_length (\d+)", override).group(1))
    assert override == data_utils.decide_max_seq_length(demo_lengths(), DEMO_BLOCK_SIZE, override=wanted).summary()
    longest, split, block_size = re.search(r"longest (\d+) in (\w+).*block_size (\d+)\)", capped).groups()
    decided = data_utils.decide_max_seq_length({split: [10, int(longest)]}, int(block_size))
    assert capped == decided.summary()


def test_length_page_headroom_product_is_exact():
    longest, decided, not_this = figure("docs/length.md", r"so (\d+) × 1\.1 is (\d+), not (\d+)\.")
    result = data_utils.decide_max_seq_length({"train": [int(longest)]}, DEMO_BLOCK_SIZE, headroom=0.1)
    assert result.max_seq_length == int(decided) != int(not_this)


# ---------------------------------------------------------------------------------------------------------------
# Batching
# ---------------------------------------------------------------------------------------------------------------


def test_batching_page_expected_share_line_is_what_the_demo_data_gives():
    """The line a run on the demo data prints at the page's micro_batch_size and global batch size."""
    micro, global_batch = figure(
        "docs/batching.md",
        r"For the demo data at `--train.micro_batch_size (\d+)` \(and the default\s+`--train.global_batch_size (\d+)`",
    )
    line = figure("docs/batching.md", r"\n(expected share of real tokens in train batches [^\n]*)\n")
    lengths = demo_lengths()
    max_seq_length = data_utils.decide_max_seq_length(lengths, DEMO_BLOCK_SIZE).max_seq_length
    expected = order.expected_efficiency(
        lengths["train"], max_seq_length, int(micro), DEMO_SEED, step_size=int(global_batch)
    )
    shares = ", ".join(f"{how} {estimate['efficiency']:.1%}" for how, estimate in expected.items())
    assert line == (
        f"expected share of real tokens in train batches (epoch 1, micro_batch_size {micro},"
        f" max_seq_length {max_seq_length}): {shares} (--seq.group_by_length, --seq.pack)"
    )


def test_batching_page_group_sizes_are_the_code_defaults():
    megabatch = figure("docs/batching.md", r"cut into megabatches of (\d+) optimizer steps")
    group = figure("docs/batching.md", r"cut into groups of (\d+), each group is packed")
    assert int(megabatch) == inspect.signature(data_utils.grouped_batches).parameters["megabatch_size"].default
    assert int(group) == packing.DEFAULT_GROUP_SIZE


def test_batching_page_long_tail_speedup_is_the_benchmarks_figure():
    """The long-tail figure on the batching page is the one measured on the benchmarks page (bench/padding.py)."""
    here = figure("docs/batching.md", r"packing\s+trained an epoch ([\d.]+)x faster than grouping")
    there = figure("docs/benchmarks.md", r"Within samples it is ([\d.]+)x faster than grouping")
    assert here == there


# ---------------------------------------------------------------------------------------------------------------
# Resume: what a checkpoint costs per sample, the sampled blocks of the base weights
# ---------------------------------------------------------------------------------------------------------------


def state_json_bytes_per_sample() -> float:
    """What one more train sample adds to state.json: its length in the list of lengths and its digest, as
    ``data_fingerprint`` writes them (the demo data's lengths, repeated; ``json.dumps`` as the header is written)."""

    def size(copies: int) -> int:
        lengths = demo_lengths()["train"] * copies
        contents = (str(i).encode() for i in range(len(lengths)))
        return len(json.dumps(data_fingerprint({"train": lengths}, {"train": contents})))

    samples = len(demo_lengths()["train"]) * 30  # a multiple of 3: whole base64 groups of the 4-byte digests
    return (size(60) - size(30)) / samples


@pytest.mark.parametrize(
    "page, pattern",
    [
        ("docs/resume.md", r"plus ~(\d+) bytes per sample\s+in\s+`state\.json`"),
        ("docs/benchmarks.md", r"plus ~(\d+) bytes per sample\s+in\s+`state\.json`"),
    ],
)
def test_resume_and_benchmarks_pages_bytes_per_sample_in_state_json(page, pattern):
    measured = state_json_bytes_per_sample()
    assert 4 * 4 / 3 < measured < 12  # the 4-byte digest in base64, and a length of 2 to 4 digits with ", "
    assert round(measured) == int(figure(page, pattern))


def test_resume_page_digest_bytes_per_sample_is_the_code_constant():
    assert int(figure("docs/resume.md", r"and (\d+) bytes of each sample's own sha256")) == SAMPLE_DIGEST
    digests = content_fingerprint([b"a", b"b", b"c"])["sample_digests"]
    assert len(base64.b64decode(digests)) == 3 * SAMPLE_DIGEST
    assert base64.b64decode(digests)[:SAMPLE_DIGEST] == hashlib.sha256(b"a").digest()[:SAMPLE_DIGEST]


def test_resume_page_sampled_blocks_of_the_base_weights():
    count, block_mib = figure("docs/resume.md", r"the sha256 of (\d+) blocks of (\d+) MiB")
    whole_mib = figure("docs/resume.md", r"a file of at most (\d+) MiB is hashed whole")
    read_mib = figure("docs/resume.md", r"At most (\d+) MiB is read, however large the file")
    mib = 1 << 20
    assert (int(count), int(block_mib) * mib) == (SAMPLED_BLOCKS, SAMPLE_BLOCK)
    whole = int(whole_mib) * mib
    assert sampled_offsets(whole) == list(range(0, whole, SAMPLE_BLOCK))  # every block
    for size in (whole + 1, 140 * 10**9):
        offsets = sampled_offsets(size)
        assert len(offsets) * SAMPLE_BLOCK <= int(read_mib) * mib
        assert offsets[0] == 0 and offsets[-1] == size - SAMPLE_BLOCK


# ---------------------------------------------------------------------------------------------------------------
# Truncation's worked example, errors' example messages
# ---------------------------------------------------------------------------------------------------------------


def test_truncation_page_worked_example_counts():
    limit, prompt, head, marker, response = figure(
        "docs/truncation.md",
        r"L = (\d+): a (\d+)-token prompt \(head (\d+), marker (\d+)\) with a (\d+)-token answer",
    )
    end_kept = figure("docs/truncation.md", r"`end` keeps the first (\d+) prompt tokens")
    first, last, cut = figure(
        "docs/truncation.md",
        r"`prompt` keeps (\d+) \+ (\d+) prompt tokens and the whole\s+answer, cutting (\d+) tokens",
    )
    marked = figure("docs/truncation.md", r"\[… (\d+) tokens cut …\]")
    parts = data_utils.SampleParts(int(prompt), int(response), int(head), int(marker))
    kept = plan(parts, int(limit), "prompt")
    assert (kept.prompt_head, kept.prompt_tail, kept.response_kept) == (int(first), int(last), int(response))
    assert kept.prompt_cut == int(cut) == int(marked)
    upstream = plan(parts, int(limit), "end")
    assert (upstream.prompt_head, upstream.response_kept) == (int(end_kept), 0)


def test_errors_page_warmup_message_is_what_check_schedule_says():
    """The `warmup_beyond_run` example: its figures given to the check, the message compared whole."""
    shown = figure("docs/errors.md", r"\| `(--train\.lr_warmup_steps \d+ is above the run's [^`]*)` \|")
    warmup, steps, epochs, per_epoch, per_step = re.search(
        r"steps (\d+) is above the run's (\d+) optimizer steps \((\d+) epochs × (\d+) micro-batches per device,"
        r" (\d+) per step\)",
        shown,
    ).groups()
    (warning,) = check_schedule(
        int(warmup),
        int(steps),
        micro_batches_per_epoch=int(per_epoch),
        epochs=int(epochs),
        accumulation=int(per_step),
    )
    assert warning["message"] == shown


# ---------------------------------------------------------------------------------------------------------------
# The limits the architecture page quotes from the tests
# ---------------------------------------------------------------------------------------------------------------


def test_architecture_page_size_limits_are_the_tests():
    import test_docs
    import test_layout

    module, entry_module, function, fit, main = figure(
        "docs/architecture.md",
        r"on a module over (\d+) lines \(`finetune_lora` (\d+)\) or a function over (\d+) \(`fit` (\d+), `main` (\d+)\)",
    )
    assert (int(module), int(entry_module)) == (test_layout.MODULE_LINES, test_layout.ENTRY_MODULE_LINES)
    assert int(function) == test_layout.FUNCTION_LINES
    assert {"fit": int(fit), "main": int(main)} == test_layout.ENTRY_FUNCTION_LINES
    for pattern in (r"the README stays under (\d+) lines", r"`README\.md` \(at most (\d+) lines\)"):
        assert int(figure("docs/architecture.md", pattern)) == test_docs.README_MAX_LINES


# ---------------------------------------------------------------------------------------------------------------
# Defaults and constants the pages quote
# ---------------------------------------------------------------------------------------------------------------


def test_readme_flags_table_defaults_are_the_seq_flags_defaults():
    from litgpt_seqlen.args import SeqArgs

    rows = re.findall(r"^\| `--seq\.(\w+)` \| `([^`]+)` \|", page_text("README.md"), flags=re.M)
    assert len(rows) >= 8
    defaults = SeqArgs()
    for name, shown in rows:
        value = getattr(defaults, name)
        assert shown == (str(value).lower() if isinstance(value, bool) else str(value)), name


def test_report_page_group_size_is_the_packing_default():
    assert int(figure("docs/report.md", r"samples packed together \((\d+)\)")) == packing.DEFAULT_GROUP_SIZE


def test_memory_page_margin_is_the_default_and_its_product_holds():
    from litgpt_seqlen.args import SeqArgs

    margin = float(figure("docs/memory.md", r"`--seq\.memory_margin ([\d.]+)` keeps"))
    share, card, kept = figure("docs/memory.md", r"(\d+)% of an (\d+) GiB card is\s+(\d+) GiB")
    assert margin == SeqArgs().memory_margin == int(share) / 100
    assert int(card) * margin == int(kept)


def test_batching_page_tolerances_are_the_packing_tests_and_the_bug_they_catch_is_the_one_measured(monkeypatch):
    """The tolerances the page gives, and the size of the loss change that positions not restarted per sample make
    on the Pythia shape (the smallest of the families), measured as the packing test measures it."""
    import test_packing

    exact, bug, inside = figure(
        "docs/batching.md", r"within (\de-\d+), tight[\s\S]*?only\s+(\de-\d+) here[\s\S]*?within (\de-\d+)\."
    )
    assert float(exact) == test_packing.EXACT["atol"] == test_packing.EXACT["rtol"]
    assert float(inside) == test_packing.FLOAT32_INSIDE["atol"]
    reference, losses = test_packing.losses_with_positions_along_the_row("pythia", monkeypatch)
    measured = max(float((a - b).abs().max()) for a, b in zip(losses, reference) if a.numel())
    assert f"{measured:.0e}" == bug


@requires_shared("the truncation page's template figures, with the real Llama 2 tokenizers")
def test_truncation_page_head_and_marker_are_the_alpaca_templates_with_llama_2():
    """The worked example's prompt template: the Alpaca prompt without an input, as the scan measures it with the
    tokenizer.json of Llama 2 (its sentencepiece model gives a head one token shorter)."""
    from litgpt.data import SFTDataset
    from litgpt.tokenizer import Tokenizer

    from litgpt_seqlen.data import scan

    head, marker = figure(
        "docs/truncation.md",
        r"Llama 2 tokenizer \(its `tokenizer.json`\), Alpaca prompt style.*\(head (\d+), marker (\d+)\)",
    )
    samples = json.loads((SHARED / "data" / "alpaca_en_demo.json").read_text(encoding="utf-8"))
    without_input = [sample for sample in samples if not sample.get("input")][:20]
    tokenizer = Tokenizer(SHARED / "tokenizers" / "llama2-hf")
    parts = scan.scan_parts(SFTDataset(without_input, tokenizer, prompt_style="alpaca"), "train")
    assert {(p.head, p.marker) for p in parts} == {(int(head), int(marker))}
