"""The README's quickstart, run as written against the demo assets: a stale README fails the build."""

import re
import shlex
import subprocess
import sys

import pytest

import assets
from helpers import ROOT

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


def test_the_quickstart_runs_as_written_on_the_demo_assets(tmp_path, monkeypatch, capsys):
    import finetune_lora

    variables, steps = commands(quickstart_block())
    assert variables == {"CKPT": "demo_run/checkpoint", "DATA": "demo_run/data"}
    assert [command[0] for command in steps] == ["litgpt-seqlen"] * 3
    assets.build_demo(tmp_path / "demo_run")
    monkeypatch.chdir(tmp_path)
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    outputs = []
    for command in steps:  # the console command is finetune_lora:cli, run here in process
        monkeypatch.setattr(sys, "argv", command)
        try:
            finetune_lora.cli()
            code = 0
        except SystemExit as leaving:
            code = leaving.code
        out, err = capsys.readouterr()
        assert code == 0, (command, err[-3000:])
        outputs.append(out)
    dry, trained, resumed = outputs
    assert "dry run: nothing trained" in dry and "max_seq_length = " in dry
    assert "Final evaluation" in trained and (tmp_path / "out/my_run/final/lit_model.pth").is_file()
    assert "Resuming from out/my_run/step-" in resumed


def test_the_console_command_in_the_quickstart_is_the_installed_one():
    command = subprocess.run(
        [sys.executable, "-c", "import importlib.metadata as m; print(m.entry_points(group='console_scripts'))"],
        capture_output=True,
        text=True,
    )
    assert "name='litgpt-seqlen', value='finetune_lora:cli'" in command.stdout
