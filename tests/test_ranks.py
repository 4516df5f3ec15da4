"""Two CPU ranks on gloo: each scans its own share, both end with the same full list of parts, bad input stops both,
a checkpoint holds every rank's own training state in one file and gives each rank its own back, and a disk that
fills while rank 0 writes one stops both ranks with its error.

One two-rank run (launching costs ~10 s of imports and process-group setup) scans three times: serially, with two
scan workers per rank, and with a bad sample in rank 1's share; then saves a checkpoint and loads it, and saves one
that rank 0 cannot write. The tests read what each rank wrote.
"""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap

import pytest
from litgpt.data import SFTDataset
from litgpt.tokenizer import Tokenizer

import assets
from helpers import ROOT
from litgpt_seqlen.data import scan

pytestmark = pytest.mark.e2e

COUNT = 1_101  # odd: rank 1's share is one sample shorter; > 2 x 512, so each rank's share gets 2 scan workers
BAD = COUNT - 2  # in rank 1's share

# Run as a script: Fabric's launcher starts rank 1 by running it again with LOCAL_RANK=1.
SCRIPT = textwrap.dedent(
    """
    import errno, json, os, sys

    root, tokenizer_dir, data_file, out, bad = sys.argv[1:6]
    sys.path.insert(0, root)
    from pathlib import Path

    import lightning as L
    import torch
    from litgpt.data import SFTDataset
    from litgpt.tokenizer import Tokenizer

    from litgpt_seqlen.checkpoint import lookup
    from litgpt_seqlen.checkpoint import state as training_state
    from litgpt_seqlen.methods import LORA
    from litgpt_seqlen.data.scan import scan_split
    from litgpt_seqlen.errors import UserInputError
    from litgpt_seqlen.training.rng import restore_rng

    fabric = L.Fabric(accelerator="cpu", devices=2, strategy="ddp")
    fabric.launch()
    rank, phase = fabric.global_rank, None

    def record(sample):  # the dataset's transform runs once per scanned sample, also in forked scan workers
        with open(os.path.join(out, f"seen-{phase}-{rank}-{os.getpid()}.txt"), "a") as f:
            f.write(f"{sample['id']}\\n")
        return sample

    samples = json.load(open(data_file))
    tokenizer = Tokenizer(tokenizer_dir)
    results = {}
    for phase, workers in (("serial", 1), ("parallel", 2), ("bad", 1)):
        print(f"rank {rank}: scan {phase}", flush=True)  # where a hang is, if one ever is
        if phase == "bad":
            del samples[int(bad)]["output"]
        dataset = SFTDataset(samples, tokenizer, prompt_style="alpaca", transform=record)
        try:
            results[phase] = {"parts": scan_split(fabric, dataset, "train", workers)}
        except UserInputError as problem:
            results[phase] = {"error": str(problem)}

    # A checkpoint: each rank's random states, running loss and token counts differ; each must get its own back.
    def fresh_state():
        model = torch.nn.Module()
        model.lora_A = torch.nn.Parameter(torch.zeros(3))
        optimizer = torch.optim.SGD([model.lora_A], lr=0.1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        return training_state.new_state(model, optimizer, scheduler, 2, fabric.device)

    def write_step_files(directory):  # as save_lora_checkpoint does: rank 0 writes
        if rank == 0:
            torch.save({"model": {"lora_A": torch.ones(3)}}, directory / LORA.weights_file)

    def fills_in_step_files(directory):
        if rank == 0:
            (directory / LORA.weights_file).write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")

    print(f"rank {rank}: checkpoint", flush=True)
    torch.manual_seed(100 + rank)
    state = fresh_state()
    state.update(step=5, iteration=10, epoch=1, position=2)
    state["running_loss"].update(torch.tensor(1.0 + rank))
    state["running_loss"].update(torch.tensor(3.0 + rank))
    state["token_counts"]["raw_tokens"] += 1000 + rank
    step_dir = Path(out) / "step-000005"
    training_state.save(fabric, step_dir, state, write_step_files, {"run": {}, "data": {}, "decision": {}}, LORA.weights_file, LORA.trainable
    )
    straight = torch.rand(4).tolist()  # what this rank draws next (dropout's numbers)

    torch.manual_seed(7)
    resumed = fresh_state()
    training_state.load(fabric, step_dir, resumed)
    restore_rng(resumed["rng"])
    results["checkpoint"] = {
        "straight": straight,
        "resumed": torch.rand(4).tolist(),
        "running_loss": resumed["running_loss"].compute().item(),
        "raw_tokens": resumed["token_counts"]["raw_tokens"].item(),
        "progress": [resumed[key] for key in ("step", "iteration", "epoch", "position")],
        "incomplete": lookup.incomplete_reason(step_dir),
        "files": sorted(path.name for path in (Path(out) / "resume" / "step-000005").iterdir()),
        "world_size": lookup.read_header(step_dir)["world_size"],
    }

    # The disk fills while rank 0 writes a checkpoint, in its step files or in fabric.save's state.pt (which ends with
    # a barrier): both ranks stop with its error, neither waits for the other.
    print(f"rank {rank}: full disk", flush=True)
    real_save = torch.save

    def fills_on_rank_0(obj, f, *args, **kwargs):
        if rank == 0 and str(getattr(f, "name", f)).endswith("state.pt"):
            f.write(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    for where, step in (("step files", 7), ("state", 8)):
        step_dir = Path(out) / f"step-{step:06d}"
        if where == "state":
            torch.save = fills_on_rank_0
        try:
            training_state.save(fabric, step_dir, state, write_step_files if where == "state" else fills_in_step_files, {}, LORA.weights_file, LORA.trainable)
            results[where] = None
        except UserInputError as problem:
            results[where] = str(problem)
        torch.save = real_save
        results[f"{where} left"] = sorted(str(path.relative_to(out)) for path in Path(out).rglob(f"*{step_dir.name}"))
    with open(os.path.join(out, f"result-{rank}.json"), "w") as f:
        json.dump(results, f)

    # The bad sample once more, as the command line meets it: one `error:` line, by rank 0, and exit 2 on both ranks.
    from litgpt_seqlen.exits.user_facing import user_facing_exits

    phase = "bad"
    with user_facing_exits():
        scan_split(fabric, SFTDataset(samples, tokenizer, prompt_style="alpaca", transform=record), "train", 1)
    """
)


def word_samples(count: int) -> list[dict]:
    rng = random.Random(1)
    words = lambda k: " ".join(rng.choices(assets.WORDS, k=k))  # noqa: E731
    return [
        {"id": i, "instruction": words(rng.randint(1, 9)), "input": "", "output": words(rng.randint(0, 300))}
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tiny_checkpoint):
    """Runs the script on two ranks; returns (its output, {rank: {phase: result}}, {(phase, rank): scanned indices})."""
    tmp = tmp_path_factory.mktemp("ranks")
    script, data_file, out = tmp / "scan_two_ranks.py", tmp / "samples.json", tmp / "out"
    script.write_text(SCRIPT)
    data_file.write_text(json.dumps(word_samples(COUNT)))
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK")}
    env.update(PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    command = [sys.executable, str(script), str(ROOT), str(tiny_checkpoint), str(data_file), str(out), str(BAD)]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    try:
        output, _ = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the whole group: rank 0 and the rank 1 it launched
        output, _ = process.communicate()
        pytest.fail(f"the two ranks hung (killed after 120 s):\n{output[-3000:]}")
    assert process.returncode == 2, output[-3000:]  # the script ends on the bad sample
    results = {rank: json.loads((out / f"result-{rank}.json").read_text()) for rank in (0, 1)}
    seen = {}
    for phase in ("serial", "parallel"):
        for rank in (0, 1):
            files = list(out.glob(f"seen-{phase}-{rank}-*.txt"))
            seen[phase, rank] = (sorted(int(line) for f in files for line in f.read_text().split()), len(files))
    return output, results, seen


@pytest.mark.parametrize("phase", ["serial", "parallel"])
def test_each_rank_scans_its_share_and_both_get_the_whole_list(two_ranks, tiny_checkpoint, phase):
    _, results, seen = two_ranks
    single = scan.scan_parts(
        SFTDataset(word_samples(COUNT), Tokenizer(tiny_checkpoint), prompt_style="alpaca"), "train"
    )
    single = [list(parts) for parts in single]  # as JSON holds them
    assert len(single) == COUNT and len({p[1] for p in single}) > 50  # lengths vary: an out-of-order gather would show
    assert len({p[0] for p in single}) > 5  # prompts vary too: a column mixed up would show
    assert results[0][phase]["parts"] == single
    assert results[1][phase]["parts"] == single
    share = (COUNT + 1) // 2
    (seen_0, processes_0), (seen_1, processes_1) = seen[phase, 0], seen[phase, 1]
    assert seen_0 == list(range(0, share))  # each index once, and only this rank's share
    assert seen_1 == list(range(share, COUNT))
    assert processes_0 == processes_1 == (1 if phase == "serial" else 2)


def test_bad_input_on_one_rank_stops_both_and_is_said_once(two_ranks):
    output, results, _ = two_ranks
    assert f"train sample {BAD} has no field 'output'" in results[1]["bad"]["error"]
    assert f"train sample {BAD} has no field 'output'" in results[0]["bad"]["error"]  # rank 0 can say it
    said = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(said) == 1 and f"train sample {BAD} has no field 'output'" in said[0], output[-3000:]
    assert "Traceback" not in output


def test_one_checkpoint_file_holds_every_ranks_state_and_gives_each_its_own_back(two_ranks):
    output, results, _ = two_ranks
    mine = [results[rank]["checkpoint"] for rank in (0, 1)]
    for rank, result in enumerate(mine):
        assert result["incomplete"] is None
        assert result["files"] == ["state.json", "state.pt"] and result["world_size"] == 2
        assert result["resumed"] == result["straight"]  # its own random states, not rank 0's
        assert result["running_loss"] == 2.0 + rank
        assert result["raw_tokens"] == 1000 + rank
        assert result["progress"] == [5, 10, 1, 2]
    assert mine[0]["straight"] != mine[1]["straight"]


def test_a_full_disk_on_rank_0_stops_both_ranks_with_its_error_and_leaves_nothing(two_ranks):
    _, results, _ = two_ranks
    for rank in (0, 1):
        step_files, state = results[rank]["step files"], results[rank]["state"]
        assert "step-000007 (No space left on device): 4 bytes of it had been written (now removed)" in step_files
        assert results[rank]["step files left"] == []
        assert "resume/step-000008 (No space left on device): 4 bytes of it had been written (now removed)" in state
        assert results[rank]["state left"] == ["step-000008"]  # the step's files, without the state: incomplete
