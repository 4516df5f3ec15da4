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
    steps = docs_commands()
    assert len(steps) >= 5 and sum("--resume" in command for command in steps) >= 1
    assets.build_demo(tmp_path / "demo_run")
    monkeypatch.chdir(tmp_path)
    for command in steps:
        if command[0] == "rm":
            for path in command[2:]:
                shutil.rmtree(path)
        elif command[:3] == ["python", "-m", "json.tool"]:
            json.loads(Path(command[3]).read_text())
        else:
            run_in_process([command], cli_argv)


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
