"""The README's quickstart and the docs' commands on the demo assets, run as written: stale docs fail the build."""

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import assets
from helpers import ROOT, requires_shared

pytestmark = pytest.mark.e2e


def quickstart_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    (block,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    return block


def commands(block: str) -> tuple[dict[str, str], list[list[str]]]:
    """The block's variables (``NAME=value ...`` lines) and its commands, with the variables filled in."""
    variables, found = {}, []
    for line in block.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        words = shlex.split(line)
        if all(re.fullmatch(r"\w+=\S+", word) for word in words):
            variables.update(word.split("=", 1) for word in words)
            continue
        found.append([re.sub(r"\$(\w+)", lambda m: variables[m.group(1)], word) for word in words])
    return variables, found


def run_in_process(steps: list[list[str]], cli_argv) -> list[str]:
    """Each command's stdout; the console command and ``python finetune_lora.py`` both run ``finetune_lora.cli``."""
    outputs = []
    for command in steps:
        ran = cli_argv(command)
        assert ran.returncode == 0, (command, ran.stderr[-3000:])
        outputs.append(ran.stdout)
    return outputs


def test_the_quickstart_runs_as_written_on_the_demo_assets(tmp_path, monkeypatch, cli_argv):
    variables, steps = commands(quickstart_block())
    assert variables == {"CKPT": "demo_run/checkpoint", "DATA": "demo_run/data"}
    assert [command[0] for command in steps] == ["litgpt-seqlen"] * 3
    assets.build_demo(tmp_path / "demo_run")
    monkeypatch.chdir(tmp_path)
    dry, trained, resumed = run_in_process(steps, cli_argv)
    assert "dry run: nothing trained" in dry and "max_seq_length = " in dry
    assert "Final evaluation" in trained and (tmp_path / "out/my_run/final/lit_model.pth").is_file()
    assert "Resuming training from out/my_run/step-" in resumed


def docs_commands() -> list[list[str]]:
    """Every ``finetune_lora.py`` command on the demo assets in docs/, in page order, its interpreter dropped."""
    found = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        for block in re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S):
            for line in block.replace("\\\n", " ").splitlines():
                words = shlex.split(line.split("#", 1)[0])
                if "finetune_lora.py" in words and "demo_run/checkpoint" in words:
                    found.append(words[words.index("finetune_lora.py") :])
                elif (words[:2] == ["rm", "-r"] or words[:3] == ["python", "-m", "json.tool"]) and found:
                    found.append(words)  # between or after the commands, as the page does it
    return found


def test_the_docs_commands_run_as_written_on_the_demo_assets(tmp_path, monkeypatch, cli_argv):
    """Each command runs; then the figures the pages show of these runs are compared with what they printed and
    wrote (``check_*`` below, one per page and figure)."""
    steps = docs_commands()
    assert len(steps) >= 5 and sum("--resume" in command for command in steps) >= 1
    assets.build_demo(tmp_path / "demo_run")
    monkeypatch.chdir(tmp_path)
    printed = {}  # --out_dir -> what its last command printed
    for command in steps:
        if command[0] == "rm":
            for path in command[2:]:
                shutil.rmtree(path)
        elif command[:3] == ["python", "-m", "json.tool"]:
            json.loads(Path(command[3]).read_text())
        else:
            (printed[command[command.index("--out_dir") + 1]],) = run_in_process([command], cli_argv)
    check_length_page_what_if_table_and_warning(printed["out/look"])
    check_resume_page_example_lines(printed["out/resumable"])
    check_benchmarks_checkpoint_sizes(tmp_path / "demo_run" / "saved")


def page_block(page: str, after: str) -> list[str]:
    """The lines of the first fenced block after the words ``after`` on ``page``."""
    text = (ROOT / page).read_text()
    block = re.search(re.escape(after) + r".*?```\w*\n(.*?)```", text, flags=re.S)
    assert block, f"{page}: no code block after {after!r}"
    return block.group(1).splitlines()


def check_length_page_what_if_table_and_warning(out: str) -> None:
    """docs/length.md's what-if table and train warning of its dry run (`out/look`), line for line, and the figures
    its reading of the table quotes; docs/errors.md quotes the same warning."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("what if max_seq_length were"))
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].startswith("  "))
    table = page_block("docs/length.md", "The command above prints:")
    assert table == lines[start:end]
    (warning,) = page_block("docs/length.md", "a warning per split (here the train one):")
    assert warning in lines
    assert f"`{warning.removeprefix('warning: ')}`" in (ROOT / "docs" / "errors.md").read_text()
    rows = {row.split()[0]: row.split()[-3:] for row in table[1:]}
    reading = re.search(
        r"Reading it: (\d+) would leave out (\d+)% of the samples \(or, under truncate, cut (\d+)% of all tokens\);"
        r" (\d+) \(p95\) costs ([\d.]+)%\s+of the samples",
        (ROOT / "docs" / "length.md").read_text(),
    ).groups()
    chosen, samples, tokens, p95, p95_samples = reading
    assert f"{float(rows[chosen][0][:-1]):.0f}" == samples and f"{float(rows[chosen][1][:-1]):.0f}" == tokens
    assert rows[p95][0] == f"{p95_samples}%" and "p95" in next(row for row in table if row.split()[0] == p95)


def check_resume_page_example_lines(out: str) -> None:
    """docs/resume.md's first block: the lines (as comments) that the resumed run prints."""
    shown = [line.removeprefix("# ") for line in page_block("docs/resume.md", "**Short answer:**") if line[:2] == "# "]
    assert [line for line in shown if line.startswith("Resum")] == shown and len(shown) == 2
    assert all(line in out.splitlines() for line in shown), (shown, out[-2000:])


def check_benchmarks_checkpoint_sizes(saved: Path) -> None:
    """docs/benchmarks.md's checkpoint sizes (and docs/resume.md's rule of thumb) from the run of its own command."""
    import torch

    from litgpt_seqlen.checkpoint.same_run import data_fingerprint

    page = (ROOT / "docs" / "benchmarks.md").read_text().partition("## Checkpoint size")[2].partition("\n## ")[0]

    def kilobytes(before: str, after: str = "") -> float:
        """The figure in KB between the words ``before`` and ``after``."""
        return float(re.search(re.escape(before) + r"\s*([\d.]+) KB" + re.escape(after), page).group(1))

    step, state = saved / "step-000003", saved / "resume" / "step-000003"
    size = {path.name: path.stat().st_size for path in [*step.iterdir(), *state.iterdir()]}
    lora = torch.load(step / "lit_model.pth.lora")["model"]
    parameters = int(re.search(r"([\d,]+) LoRA parameters", page).group(1).replace(",", ""))
    assert sum(tensor.numel() for tensor in lora.values()) == parameters
    measured = {
        ("`step-000003/` is",): sum(path.stat().st_size for path in step.iterdir()),
        ("(", " of it `lit_model.pth.lora`"): size["lit_model.pth.lora"],
        ("`resume/step-000003/` adds",): size["state.pt"] + size["state.json"],
        ("`state.pt`",): size["state.pt"],
        ("`state.json`",): size["state.json"],
    }
    for words, bytes_ in measured.items():
        assert abs(kilobytes(*words) - bytes_ / 1000) < 0.1, (words, bytes_)
    # the rule of thumb: state = 3 x LoRA file + a fixed part + bytes per sample; both pages give the fixed part
    header = json.loads((state / "state.json").read_text())
    lengths = {name: split["lengths"] for name, split in header["data"].items()}
    per_sample = len(json.dumps(data_fingerprint(lengths))) - len(
        json.dumps(data_fingerprint(dict.fromkeys(lengths, [])))
    )
    samples = sum(map(len, lengths.values()))
    per_sample += samples * 16 / 3  # the 4-byte digests in base64
    fixed = size["state.pt"] + size["state.json"] - 3 * size["lit_model.pth.lora"] - per_sample
    for name in ("benchmarks.md", "resume.md"):
        text = (ROOT / "docs" / name).read_text()
        (rule,) = re.findall(r"about three times the LoRA file plus ~(\d+) KB", text)
        assert round(fixed / 1000) == int(rule), (name, fixed)


def test_the_console_command_in_the_quickstart_is_the_installed_one():
    command = subprocess.run(
        [sys.executable, "-c", "import importlib.metadata as m; print(m.entry_points(group='console_scripts'))"],
        capture_output=True,
        text=True,
    )
    assert "name='litgpt-seqlen', value='finetune_lora:cli'" in command.stdout


@requires_shared("the docs/benchmarks.md recipe tests")
def test_the_benchmarks_recipe_on_the_real_data_runs_as_written(tmp_path, monkeypatch, cli_argv):
    """docs/benchmarks.md's truncation recipe (real tokenizer, real data in ../shared), its /tmp paths moved aside:
    the shell lines by bash, the python ones in this process (``python -c`` code, ``python finetune_lora.py``)."""
    page = (ROOT / "docs" / "benchmarks.md").read_text()
    (block,) = [block for block in re.findall(r"```bash\n(.*?)```", page, flags=re.S) if "../shared" in block]
    monkeypatch.chdir(ROOT)
    for line in block.replace("/tmp/", f"{tmp_path}/").replace("\\\n", " ").splitlines():
        words = shlex.split(line)
        if words[:2] == ["python", "-c"]:
            exec(compile(words[2], "<docs/benchmarks.md>", "exec"), {})
        elif words[:2] == ["python", "finetune_lora.py"]:
            run_in_process([words[1:]], cli_argv)
        elif words:
            assert subprocess.run(["bash", "-e", "-c", line], capture_output=True).returncode == 0, line
    report = json.loads((tmp_path / "trunc_end_128" / "seq_lengths.json").read_text())
    assert report["max_seq_length"] == 128 and report["truncate_from"] == "end" and report["dry_run"] is True
