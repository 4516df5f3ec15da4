"""Shared fixtures: a tiny word-level tokenizer, a random-weight checkpoint and data of exact lengths, all built here."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

import assets
from helpers import cli_args

# The same examples on every run, so CI cannot pass or fail by chance; HYPOTHESIS_PROFILE=explore draws new ones.
# No deadline in any profile, hypothesis's own "default" included: a test must not pass or fail by the machine's speed.
settings.register_profile("default", deadline=None)
settings.register_profile("ci", derandomize=True, deadline=None)
settings.register_profile("explore", derandomize=False, deadline=None)
settings.register_profile(
    "fast", derandomize=True, max_examples=10, deadline=None
)  # make test-fast: quick feedback; make test runs all
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A 2-layer random GPT with block_size 512 and a word-level tokenizer."""
    directory = tmp_path_factory.mktemp("checkpoint")
    assets.build_tokenizer(directory)
    assets.build_checkpoint(directory, block_size=512)
    return directory


@pytest.fixture
def make_data(tmp_path, tiny_checkpoint):
    """make_data(train_lengths, val_lengths) -> a JSON data dir whose samples have exactly those token lengths."""

    def make(train_lengths, val_lengths, name="data") -> Path:
        directory = tmp_path / name
        assets.build_data(directory, tiny_checkpoint, train_lengths, val_lengths)
        return directory

    return make


@pytest.fixture
def cli_argv(monkeypatch, capsys):
    """cli_argv(argv): ``finetune_lora.cli()`` run in this process with ``sys.argv`` set to ``argv``, returned as a
    CompletedProcess: the exit code from its SystemExit, stdout and stderr from capsys. Any exception other than
    SystemExit fails the test (no traceback)."""
    import finetune_lora

    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)

    def run_here(argv: list[str]) -> subprocess.CompletedProcess:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", argv)
        try:
            finetune_lora.cli()
            code = 0
        except SystemExit as leaving:
            code = leaving.code
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(argv, code, out, err)

    return run_here


@pytest.fixture
def cli_here(cli_argv, tiny_checkpoint):
    """cli_here(data_dir, out_dir, *flags, steps=2, checkpoint=tiny_checkpoint): what run_cli runs, but in this process
    (``cli_argv``)."""

    def run_here(data_dir: Path, out_dir: Path, *flags: str, steps: int = 2, checkpoint: Path | None = None):
        return cli_argv(
            ["finetune_lora.py", str(checkpoint or tiny_checkpoint), *cli_args(data_dir, out_dir, *flags, steps=steps)]
        )

    return run_here


def pytest_collection_modifyitems(items):
    """A test that runs the command line in process (``cli_here``, ``cli_argv``) is end to end too: `make test-fast`
    leaves it out."""
    for item in items:
        if {"cli_here", "cli_argv"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)
