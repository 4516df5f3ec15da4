"""The docs stay true: every relative link resolves, the README stays short, the flags the commands use exist, and
docs/report.md lists every key of a real seq_lengths.json."""

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

import assets
from litgpt_seqlen.cli.parser import build_parser
from litgpt_seqlen.methods import LORA

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
REPORT_PAGE = ROOT / "docs" / "report.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
# A key path of the report: names joined by dots, `<split>` for any split, `[]` after a list whose items follow.
KEY_PATH = re.compile(r"^[a-z_][a-z0-9_]*(\[\])?(\.(<split>|[a-z_][a-z0-9_]*)(\[\])?)*$")
# Documented keys that the dry runs below cannot write: what training, the rehearsal and a resume add, and the fields
# of warning kinds those runs do not provoke.
WRITTEN_BY_OTHER_RUNS = ("batches", "rehearsal", "memory", "resumed_from", "warnings[]")


def prose(path: Path) -> str:
    """The page without its fenced code blocks (a link in code is not a link)."""
    return FENCE.sub("", path.read_text(encoding="utf-8"))


def slug(heading: str) -> str:
    """A heading's anchor as GitHub makes it: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in prose(path).splitlines() if re.match(r"#{1,6} ", line)}


def relative_links(path: Path) -> list[str]:
    return [target for target in LINK.findall(prose(path)) if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.relative_to(ROOT).as_posix())
def test_every_relative_link_resolves(page):
    broken = []
    for target in relative_links(page):
        file, _, anchor = target.partition("#")
        linked = (page.parent / file).resolve() if file else page
        if not linked.exists():
            broken.append(f"{target}: no {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert not broken, broken


def test_every_page_is_linked_from_the_readme():
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in relative_links(README)}
    assert [page.name for page in PAGES[1:] if page.resolve() not in linked] == []


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move the depth to docs/"


# ---------------------------------------------------------------------------------------------------------------
# The report schema page against real reports
# ---------------------------------------------------------------------------------------------------------------


def report_keys(report: dict) -> set[str]:
    """Every key path of a seq_lengths.json dict, containers included: ``splits.<split>.p50`` for every split,
    ``what_if[].label`` for the rows of a list of objects, ``warnings[].kind``; a list of plain values is one key."""
    keys: set[str] = set()

    def walk(value, path: str) -> None:
        keys.add(path)
        if isinstance(value, dict):
            for name, item in value.items():
                walk(item, f"{path}.{'<split>' if path == 'splits' else name}")
        elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
            for item in value:
                for name, field in item.items():
                    walk(field, f"{path}[].{name}")

    for name, value in report.items():
        walk(value, name)
    return keys


def documented_keys() -> list[str]:
    """The first column of the table under '## Keys' in docs/report.md, one key path per row."""
    text = REPORT_PAGE.read_text(encoding="utf-8").partition("\n## Keys\n")[2]
    return re.findall(r"^\| `([^`]+)` \|", text, re.M)


def test_report_keys_flattens_splits_lists_and_containers():
    report = {
        "max_seq_length": 521,
        "splits": {"train": {"p50": 196, "max": 466}, "test": {"p50": None, "max": None}},
        "what_if": [{"max_seq_length": 128, "label": ""}, {"max_seq_length": 521, "label": "chosen"}],
        "warnings": [],
        "rehearsal": {"train_batch": [2, 466], "device": "cpu"},
    }
    assert report_keys(report) == {
        "max_seq_length",
        "splits",
        "splits.<split>",
        "splits.<split>.p50",
        "splits.<split>.max",
        "what_if",
        "what_if[].max_seq_length",
        "what_if[].label",
        "warnings",
        "rehearsal",
        "rehearsal.train_batch",
        "rehearsal.device",
    }


def test_the_report_page_documents_each_key_once_as_a_key_path():
    keys = documented_keys()
    assert len(keys) > 50
    assert sorted(key for key in set(keys) if keys.count(key) > 1) == []
    assert [key for key in keys if not KEY_PATH.match(key)] == []


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    """The demo assets, built as `make demo` builds them: DIR/checkpoint and DIR/data."""
    directory = tmp_path_factory.mktemp("demo")
    assets.build_demo(directory)
    return directory


def dry_run_report(cli_here, demo_dir: Path, out_dir: Path, *flags: str) -> dict:
    run = cli_here(demo_dir / "data", out_dir, "--seq.dry_run", "true", *flags, checkpoint=demo_dir / "checkpoint")
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads((out_dir / "seq_lengths.json").read_text())


@pytest.mark.e2e
def test_the_report_page_lists_every_key_a_dry_run_writes(cli_here, demo_dir, tmp_path):
    # The plain dry run, and one that adds what drop, an override and packing write (dropped, cut_share warnings,
    # the packed estimate's rows and group size).
    plain = dry_run_report(cli_here, demo_dir, tmp_path / "plain")
    packed = dry_run_report(
        cli_here,
        demo_dir,
        tmp_path / "packed",
        "--train.max_seq_length",
        "256",
        "--seq.over_length",
        "drop",
        "--seq.pack",
        "true",
    )
    assert plain["dry_run"] is True and packed["batches_estimate"]["packed"] is True
    written = report_keys(plain) | report_keys(packed)
    documented = set(documented_keys())

    assert sorted(written - documented) == [], "keys the run writes that docs/report.md lacks"
    unseen = documented - written
    assert sorted(key for key in unseen if not key.startswith(WRITTEN_BY_OTHER_RUNS)) == [], (
        "keys docs/report.md lists that no run writes"
    )


# ---------------------------------------------------------------------------------------------------------------
# The flags the docs use exist
# ---------------------------------------------------------------------------------------------------------------

FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)*)(?![\w*<])")


def command_lines(path: Path) -> list[str]:
    """The finetune_lora.py / litgpt-seqlen commands of the page's code blocks, continuation lines joined."""
    commands = []
    for block in FENCE.findall(path.read_text(encoding="utf-8")):
        for line in block.replace("\\\n", " ").splitlines():
            if "finetune_lora.py" in line or line.lstrip().startswith("litgpt-seqlen"):
                commands.append(line)
    return commands


def flags_used() -> dict[str, set[str]]:
    used: dict[str, set[str]] = {}
    for page in PAGES:
        for command in command_lines(page):
            for flag in FLAG.findall(command):
                used.setdefault(flag, set()).add(page.name)
    table = README.read_text(encoding="utf-8").partition("\n## Flags\n")[2].partition("\n## ")[0]
    for flag in re.findall(r"^\| `--([a-z][a-z0-9_.]*)` \|", table, re.M):
        used.setdefault(flag, set()).add("README.md flags table")
    return used


def help_flags(*arguments: str) -> set[str]:

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), pytest.raises(SystemExit) as leaving:
        build_parser(LORA).parse_args(list(arguments))
    assert leaving.value.code == 0
    return set(re.findall(r"--([a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)*)", printed.getvalue()))


def test_every_flag_in_the_docs_commands_is_one_the_command_line_knows():
    used = flags_used()
    assert {"seq.dry_run", "resume", "data.json_path"} <= set(used)
    known = help_flags("--help") | help_flags("--data.help", "JSON")
    unknown = {flag: sorted(pages) for flag, pages in used.items() if flag not in known}
    assert unknown == {}
