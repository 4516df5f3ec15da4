"""What several test modules share: paths, the flags of a short CPU run, running the CLI, reading its report."""

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


SHARED = ROOT.parent / "shared"


def cli_args(data_dir: Path, out_dir: Path, *flags: str, steps: int = 2) -> list[str]:
    """The flags of a short CPU run (after the checkpoint argument), as run_cli and the in-process tests pass them."""
    return [
        "--data",
        "JSON",
        "--data.json_path",
        str(data_dir),
        "--data.num_workers",
        "0",
        "--out_dir",
        str(out_dir),
        "--precision",
        "32-true",
        "--train.global_batch_size",
        "2",
        "--train.micro_batch_size",
        "2",
        *(["--train.max_steps", str(steps)] if steps is not None else []),
        "--train.lr_warmup_steps",
        "1",
        "--eval.interval",
        "1000",
        "--eval.max_new_tokens",
        "4",
        "--eval.max_iters",
        "2",
        *flags,
    ]


def run_cli(
    checkpoint: Path, data_dir: Path, out_dir: Path, *flags: str, steps: int = 2
) -> subprocess.CompletedProcess:
    """Runs finetune_lora.py in a subprocess for a few CPU steps; returns the finished process (never raises on exit code)."""
    command = [
        sys.executable,
        str(ROOT / "finetune_lora.py"),
        str(checkpoint),
        *cli_args(data_dir, out_dir, *flags, steps=steps),
    ]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=out_dir.parent, timeout=600)


def read_report(out_dir: Path) -> dict:
    return json.loads((out_dir / "seq_lengths.json").read_text())


def shared_assets(what: str, shared: Path = SHARED) -> pytest.MarkDecorator:
    """Skips ``what`` (tests that read the real data and tokenizers in ../shared) when either folder is missing, with a
    reason that names the folder and what to do."""
    missing = [name for name in ("data", "tokenizers") if not (shared / name).is_dir()]
    return pytest.mark.skipif(
        bool(missing),
        reason=f"{what} need {' and '.join(str(shared / name) for name in missing)}: the project's shared assets, "
        "a folder beside the clone; put them there to run these tests",
    )


def requires_shared(what: str):
    """For a test of ``what`` on the real data and tokenizers in ../shared: skipped cleanly without them (see
    ``shared_assets``), and end to end (seconds), so `make test-fast` leaves it out."""
    return lambda test: pytest.mark.e2e(shared_assets(what)(test))


def loaders_for(fabric, data, plan, micro_batch_size: int, how: str = "random", seed: int = 0):
    """The train and val loaders a run builds for ``plan`` with this batch order."""
    from litgpt_seqlen.data.loaders import make_loaders
    from litgpt_seqlen.data.order import train_batches

    batches_for_epoch = train_batches(
        plan.kept_lengths("train"),
        plan.decision.max_seq_length,
        micro_batch_size,
        how,
        seed,
        fabric.global_rank,
        fabric.world_size,
    )
    return make_loaders(fabric, data, plan, batches_for_epoch, seed, pack=how == "packed")


def tiny_config(**overrides):
    """The small LoRA-capable GPT config the tests build by hand (``assets.build_checkpoint`` builds the demo's)."""
    from litgpt.lora import Config

    return Config(
        **{
            "block_size": 64,
            "vocab_size": 50,
            "padded_vocab_size": 50,
            "n_layer": 1,
            "n_head": 2,
            "n_embd": 16,
            **overrides,
        }
    )


OUTLIERS = (950, 1500, 2200, 3050)


def long_tailed_lengths() -> dict[str, list[int]]:
    """190 train samples of 50-250 tokens with 4 far longer ones among them, and a val split without a tail."""
    rng = random.Random(7)
    train = [rng.randint(50, 250) for _ in range(190)]
    for position, length in zip((17, 60, 111, 170), OUTLIERS):
        train.insert(position, length)
    return {"train": train, "val": [rng.randint(50, 250) for _ in range(20)]}


def stopped_by_sigterm_after_step_one(command: list[str]) -> subprocess.CompletedProcess:
    """``command`` (a training run, any number of ranks) in its own process group, sent SIGTERM as a scheduler would
    once its first optimizer step is printed; returns how it ended."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    for line in process.stdout:
        if " step 1 " in line and "(step)" in line:
            os.killpg(process.pid, signal.SIGTERM)
            break
    out, err = process.communicate(timeout=300)
    return subprocess.CompletedProcess(command, process.returncode, out, err)


# Runs finetune_lora's command line in a process whose address space is limited (``ulimit -v``) once everything is
# imported: BUDGET bytes above what it uses then. Only the rank named by LIMITED_RANK ("all": every rank, "none": no
# rank, for a run to compare with in the same conditions) is limited;
# Fabric's launcher starts rank 1 by running this same script with LOCAL_RANK=1.
LIMITED_RUN = """
import os, resource, sys
sys.path.insert(0, os.environ["PROJECT_ROOT"])
import finetune_lora
from litgpt_seqlen.memory.limits import address_space_in_use

if os.environ["LIMITED_RANK"] in ("all", os.environ.get("LOCAL_RANK", "0")):
    limit = address_space_in_use() + int(os.environ["BUDGET"])
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.RLIM_INFINITY))
finetune_lora.cli()
"""


def run_with_memory_limit(
    tmp: Path, budget: int, arguments: list[str], limited_rank: str = "all", timeout: int = 600
) -> subprocess.CompletedProcess:
    """``finetune_lora.py ARGUMENTS`` with at most ``budget`` bytes of address space more than the imports take."""
    script = tmp / "limited_run.py"
    script.write_text(LIMITED_RUN)
    env = dict(
        os.environ, PYTHONWARNINGS="ignore", BUDGET=str(budget), LIMITED_RANK=limited_rank, PROJECT_ROOT=str(ROOT)
    )
    env.update(OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="2")  # fewer threads and arenas: a steadier address space
    env = {k: v for k, v in env.items() if k not in ("LOCAL_RANK", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK")}
    command = [sys.executable, str(script), *arguments]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp, timeout=timeout)


def litgpt_here(monkeypatch, *argv: str) -> int:
    """litgpt's own command line (``litgpt ARGV``, what its console command runs), in this process; its exit code."""
    from litgpt.__main__ import main

    monkeypatch.setattr(sys, "argv", ["litgpt", *argv])
    try:
        main()
    except SystemExit as leaving:
        return leaving.code or 0
    return 0
