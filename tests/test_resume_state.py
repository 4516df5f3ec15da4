"""Resume state: --resume's meaning, crash-safe checkpoints, the resumable data order, RNG and bit-identical training."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from litgpt.data.base import get_sft_collate_fn
from litgpt.finetune.lora import get_lr_scheduler
from litgpt.lora import GPT, Config, mark_only_lora_as_trainable
from litgpt.utils import chunked_cross_entropy
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler
from torchmetrics import RunningMean

import data_utils
import resume_state as rs
from data_utils import UserInputError

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints on disk
# ---------------------------------------------------------------------------------------------------------------


def write_lora_file(directory: Path, value: float = 1.0) -> None:
    torch.save({"model": {"lora_A": torch.full((2, 2), value)}}, directory / rs.LORA_FILE)


def save_checkpoint(out_dir: Path, step: int, value: float = 1.0) -> Path:
    step_dir = out_dir / f"step-{step:06d}"
    header = {"progress": {"step": step}, "run": {}, "data": {}, "decision": {}}
    rs.save_resumable_checkpoint(step_dir, lambda tmp: write_lora_file(tmp, value), header, {"x": torch.tensor(step)})
    return step_dir


def test_resume_values_parse_as_litgpt_takes_them():
    assert [rs.parse_resume(v) for v in (False, "false", None, True, "True", "auto")] == [
        False,
        False,
        False,
        True,
        True,
        "auto",
    ]
    assert rs.parse_resume("out/step-000002") == Path("out/step-000002")


def test_false_never_looks(tmp_path):
    save_checkpoint(tmp_path, 2)
    assert rs.find_checkpoint(tmp_path, False) is None


def test_auto_picks_the_newest_complete_and_skips_partial_ones(tmp_path):
    complete = save_checkpoint(tmp_path, 2)
    save_checkpoint(tmp_path, 4)
    (tmp_path / "step-000006").mkdir()  # killed after the step dir, before its state
    write_lora_file(tmp_path / "step-000006")
    (tmp_path / ".tmp-step-000008").mkdir()  # killed while writing the step dir
    write_lora_file(tmp_path / ".tmp-step-000008")
    (tmp_path / "resume" / "step-000004" / "rank-0.pt").unlink()  # a state without its tensors
    notes = []
    assert rs.find_checkpoint(tmp_path, "auto", log=notes.append) == complete
    assert [note.split(":")[0] for note in notes] == [
        f"Skipping {tmp_path / 'step-000006'}",
        f"Skipping {tmp_path / 'step-000004'}",
        f"Resuming from {complete}, the newest complete checkpoint in --out_dir {tmp_path} (--resume auto).",
    ]
    assert rs.find_checkpoint(tmp_path, True, log=notes.append) == complete


def test_auto_starts_fresh_and_true_errors_without_a_complete_checkpoint(tmp_path):
    (tmp_path / "step-000002").mkdir()
    write_lora_file(tmp_path / "step-000002")
    assert rs.find_checkpoint(tmp_path, "auto", log=lambda _: None) is None
    with pytest.raises(
        UserInputError, match=r"--resume true: there is no complete checkpoint in --out_dir .* --resume auto"
    ):
        rs.find_checkpoint(tmp_path, True, log=lambda _: None)


def test_a_path_must_be_a_complete_checkpoint(tmp_path):
    save_checkpoint(tmp_path, 2)
    assert rs.find_checkpoint(tmp_path, str(tmp_path / "step-000002"), log=lambda _: None) == tmp_path / "step-000002"
    for path, reason in [
        (tmp_path / "step-000009", "no such directory"),
        (tmp_path / "final", "no training state"),
    ]:
        if path.name == "final":
            path.mkdir()
            write_lora_file(path)
        with pytest.raises(UserInputError, match=rf"--resume {path}: not a checkpoint to resume from: {reason}"):
            rs.find_checkpoint(tmp_path, path, log=lambda _: None)


def test_a_step_dir_written_over_after_its_state_is_not_complete(tmp_path):
    step_dir = save_checkpoint(tmp_path, 2, value=1.0)
    write_lora_file(step_dir, value=2.0)  # e.g. a fresh run writing over it, killed before its own state
    assert "not the one its training state was saved with" in rs.incomplete_reason(step_dir)


def test_rewriting_a_checkpoint_replaces_both_parts(tmp_path):
    save_checkpoint(tmp_path, 2, value=1.0)
    step_dir = save_checkpoint(tmp_path, 2, value=3.0)
    assert rs.incomplete_reason(step_dir) is None
    assert torch.load(step_dir / rs.LORA_FILE)["model"]["lora_A"][0, 0] == 3.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resume", "step-000002"]  # no temporaries left


def test_a_write_that_fails_midway_leaves_the_old_checkpoint_and_a_temporary_that_is_removed(tmp_path):
    step_dir = save_checkpoint(tmp_path, 2, value=1.0)

    def dies(tmp: Path) -> None:
        write_lora_file(tmp, 5.0)
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        rs.write_checkpoint_dir_atomically(step_dir, dies)
    assert torch.load(step_dir / rs.LORA_FILE)["model"]["lora_A"][0, 0] == 1.0
    assert rs.remove_stale_temporaries(tmp_path) == [tmp_path / ".tmp-step-000002"]


class Killed(BaseException):
    pass


def test_a_kill_at_any_file_operation_of_a_rewrite_leaves_only_whole_checkpoints(tmp_path, monkeypatch):
    """Rewriting step-000004 (as a fresh run in the same out_dir does), "killed" at its n-th rename or removal, for
    every n: auto resume then chooses a checkpoint whose LoRA file and state belong together, and once the rewrite
    has got through, the new one."""
    real = {"replace": os.replace, "rmtree": rs.shutil.rmtree}
    n = 0
    while True:
        out_dir = tmp_path / f"kill-{n}"
        save_checkpoint(out_dir, 2, value=2.0)
        save_checkpoint(out_dir, 4, value=4.0)
        calls = []

        def dying(name, calls=calls, n=n):
            def operation(*args, **kwargs):
                calls.append(name)
                if len(calls) > n:
                    raise Killed
                return real[name](*args, **kwargs)

            return operation

        monkeypatch.setattr(rs.os, "replace", dying("replace"))
        monkeypatch.setattr(rs.shutil, "rmtree", dying("rmtree"))
        try:
            rs.save_resumable_checkpoint(
                out_dir / "step-000004", lambda tmp: write_lora_file(tmp, 40.0), {"progress": {"step": 40}}, {}
            )
            finished = True
        except Killed:
            finished = False
        monkeypatch.undo()
        chosen = rs.find_checkpoint(out_dir, "auto", log=lambda _: None)
        value = torch.load(chosen / rs.LORA_FILE)["model"]["lora_A"][0, 0].item()
        assert value == {2: 2.0, 4: 4.0, 40: 40.0}[rs.read_header(chosen)["progress"]["step"]]
        if finished:
            assert value == 40.0 and not list(out_dir.rglob(".tmp-*")) and n >= 4
            break
        n += 1


def test_a_fresh_run_forgets_the_old_runs_states_but_keeps_their_weights(tmp_path):
    save_checkpoint(tmp_path, 2)
    save_checkpoint(tmp_path, 4)
    assert rs.forget_training_states(tmp_path) == ["step-000002", "step-000004"]
    assert rs.find_checkpoint(tmp_path, "auto", log=lambda _: None) is None
    assert (tmp_path / "step-000004" / rs.LORA_FILE).is_file()


@pytest.mark.e2e
def test_sigkill_during_a_save_never_leaves_a_complete_looking_checkpoint(tmp_path):
    """A process saves checkpoints in a loop (big files, so saves take a while) and is SIGKILLed mid-way; whatever
    it left, auto resume chooses a checkpoint that is whole (its state names it and its LoRA file matches)."""
    script = tmp_path / "saver.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {str(ROOT)!r})
        import resume_state as rs
        from pathlib import Path
        out = Path(sys.argv[1])
        for step in range(1, 1000):
            def write(tmp, step=step):
                torch.save({{"model": {{"lora_A": torch.full((1 << 20,), float(step))}}}}, tmp / rs.LORA_FILE)
            rs.save_resumable_checkpoint(out / f"step-{{step % 3:06d}}", write, {{"progress": {{"step": step}}}},
                                         {{"big": torch.full((1 << 20,), float(step))}})
            print(step, flush=True)
    """)
    )
    out_dir = tmp_path / "out"
    process = subprocess.Popen([sys.executable, str(script), str(out_dir)], stdout=subprocess.PIPE, text=True)
    for _ in range(4):
        process.stdout.readline()
    time.sleep(0.03)
    process.kill()
    process.wait()
    chosen = rs.find_checkpoint(out_dir, "auto", log=lambda _: None)
    assert chosen is not None
    step = rs.read_header(chosen)["progress"]["step"]
    assert torch.load(chosen / rs.LORA_FILE)["model"]["lora_A"][0] == step
    assert rs.read_rank_state(chosen)["big"][0] == step


# ---------------------------------------------------------------------------------------------------------------
# Same run, same data
# ---------------------------------------------------------------------------------------------------------------


def test_check_same_run_names_every_change():
    saved = {
        "run": {"train.micro_batch_size": 2, "seed": 1337, "seq.group_by_length": False},
        "data": rs.data_fingerprint({"train": [5, 6, 7], "val": [3, 4]}),
    }
    rs.check_same_run(
        saved, {"run": dict(saved["run"]), "data": rs.data_fingerprint({"train": [5, 6, 7], "val": [3, 4]})}
    )
    current = {
        "run": {"train.micro_batch_size": 4, "seed": 1337, "seq.group_by_length": True},
        "data": rs.data_fingerprint({"train": [5, 9, 7], "val": [3, 4, 4]}),
    }
    with pytest.raises(UserInputError) as error:
        rs.check_same_run(saved, current, "out/step-000004")
    message = str(error.value)
    assert message.startswith("cannot resume from out/step-000004")
    assert "--train.micro_batch_size was 2, now 4" in message
    assert "--seq.group_by_length was False, now True" in message
    assert "--seed" not in message
    assert "train sample 1 had 6 tokens, now 9" in message
    assert "the val split had 2 samples, now 3" in message


def test_the_length_decision_round_trips():
    record = rs.decision_record(300, {"train": [0, 2, 3], "val": [0, 1]}, {"train": 5, "val": 2})
    record = json.loads(json.dumps(record))
    assert record["dropped"] == {"train": [1, 4], "val": []}
    assert rs.kept_from_record(record) == {"train": [0, 2, 3], "val": [0, 1]}


def test_a_checkpoint_of_another_base_model_is_refused(tmp_path):
    (tmp_path / "base").mkdir()
    (tmp_path / "step-000002").mkdir()
    (tmp_path / "base" / "model_config.yaml").write_text("n_layer: 2\nn_embd: 32\n")
    (tmp_path / "step-000002" / "model_config.yaml").write_text("n_layer: 4\nn_embd: 32\n")
    with pytest.raises(UserInputError, match=r"another base model .*\(n_layer: 4 there, 2 here\)"):
        rs.check_same_model(tmp_path / "step-000002", tmp_path / "base")


# ---------------------------------------------------------------------------------------------------------------
# Random states and the running loss
# ---------------------------------------------------------------------------------------------------------------


def draws() -> tuple:
    return random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(3).tolist()


def test_rng_states_round_trip_through_a_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    torch.save(rs.capture_rng(), tmp_path / "rng.pt")
    expected = draws()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    rs.restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert draws() == expected


def test_running_mean_window_round_trips():
    losses = [torch.tensor(x) for x in (1.0, 2.0, 4.0, 8.0, 16.0)]
    straight = RunningMean(window=3)
    for loss in losses[:4]:
        straight.update(loss)
    state = rs.running_mean_state(straight)
    resumed_fresh = RunningMean(window=3)
    rs.restore_running_mean(resumed_fresh, state)
    straight.update(losses[4])
    resumed_fresh.update(losses[4])
    assert resumed_fresh.compute() == straight.compute() == torch.tensor((4.0 + 8.0 + 16.0) / 3)


# ---------------------------------------------------------------------------------------------------------------
# Data order
# ---------------------------------------------------------------------------------------------------------------


class CountingDataset(Dataset):
    """Samples of given token lengths; counts every ``__getitem__``."""

    def __init__(self, lengths: list[int], vocab: int = 64) -> None:
        self.lengths, self.vocab, self.reads = lengths, vocab, []
        generator = torch.Generator().manual_seed(0)
        self.tokens = [torch.randint(1, vocab, (n,), generator=generator) for n in lengths]

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> dict:
        self.reads.append(index)
        ids = self.tokens[index]
        return {
            "input_ids": ids,
            "labels": ids.clone(),
            "token_counts": {"raw": len(ids), "raw_plus_prompt_template": len(ids)},
        }


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_random_batches_are_distributed_samplers_order(world_size):
    n, batch_size, seed = 11, 2, 42
    dataset = list(range(n))
    for epoch in (0, 3):
        for rank in range(world_size):
            reference = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
            reference.set_epoch(epoch)
            expected = list(BatchSampler(reference, batch_size, drop_last=False))
            assert rs.random_batches(n, batch_size, seed, epoch, rank, world_size) == expected


def make_sampler(kind: str, lengths: list[int], batch_size: int, seed: int) -> rs.ResumableBatchSampler:
    if kind == "grouped":
        return rs.ResumableBatchSampler(
            lambda epoch: data_utils.grouped_batches(lengths, batch_size, seed, epoch, megabatch_size=2)
        )
    return rs.ResumableBatchSampler(lambda epoch: rs.random_batches(len(lengths), batch_size, seed, epoch))


@pytest.mark.parametrize("kind", ["random", "grouped"])
def test_skipping_reads_only_the_remaining_batches_of_the_epoch(kind):
    lengths = [3, 9, 4, 7, 5, 8, 2, 6, 11, 3, 5]
    dataset = CountingDataset(lengths)
    sampler = make_sampler(kind, lengths, 2, seed=7)
    loader = rs.resumable_loader(DataLoader(dataset, collate_fn=get_sft_collate_fn()), sampler, seed=7)
    straight = rs.EpochBatches(loader, sampler)
    uninterrupted = [next(straight)["input_ids"] for _ in range(3 * len(sampler))]  # three epochs
    epoch_1 = sampler.batches(1)

    dataset.reads.clear()
    resumed = rs.EpochBatches(loader, sampler, epoch=1, position=4)
    following = [next(resumed)["input_ids"] for _ in range(len(sampler) - 4 + 2)]  # rest of epoch 1, 2 of epoch 2
    assert dataset.reads == [i for batch in epoch_1[4:] + sampler.batches(2)[:2] for i in batch]
    expected = uninterrupted[len(sampler) + 4 : 2 * len(sampler) + 2]
    assert all(torch.equal(a, b) for a, b in zip(following, expected, strict=True))
    assert (resumed.epoch, resumed.position) == (2, 2)


def test_worker_processes_see_each_epoch_once_in_order():
    """A DataLoader with workers calls the batch sampler's iter() twice per pass; epochs must still go 0, 1, 2."""
    lengths = [5, 12, 7, 9, 3, 14, 6]
    sampler = rs.ResumableBatchSampler(lambda epoch: rs.random_batches(len(lengths), 2, 7, epoch))
    loader = DataLoader(list(range(len(lengths))), batch_sampler=sampler, num_workers=2, collate_fn=list)
    passes = [list(loader) for _ in range(3)]
    assert passes == [rs.random_batches(len(lengths), 2, 7, epoch) for epoch in range(3)]
    sampler.set_position(1, 2)
    assert list(loader) == rs.random_batches(len(lengths), 2, 7, 1)[2:]


def test_fabric_wrapped_loader_keeps_the_order_and_the_global_rng(tmp_path):
    """Set up by Fabric as the flow does (use_distributed_sampler=False), the loader hands out the sampler's batches
    in order across epochs, and starting an epoch draws nothing from the global torch RNG (dropout's)."""
    import lightning as L

    fabric = L.Fabric(accelerator="cpu", devices=1)
    lengths = [3, 9, 4, 7, 5]
    dataset = CountingDataset(lengths)
    sampler = make_sampler("random", lengths, 2, seed=3)
    loader = fabric.setup_dataloaders(
        rs.resumable_loader(DataLoader(dataset, collate_fn=get_sft_collate_fn()), sampler, seed=3),
        use_distributed_sampler=False,
    )
    assert len(loader) == 3
    batches = rs.EpochBatches(loader, sampler, epoch=1, position=1)
    torch.manual_seed(0)
    expected_draw = torch.rand(1)
    torch.manual_seed(0)
    for _ in range(4):
        next(batches)
    assert torch.equal(torch.rand(1), expected_draw)
    assert dataset.reads == [i for batch in sampler.batches(1)[1:] + sampler.batches(2)[:2] for i in batch]


def test_an_epoch_ended_exactly_at_the_checkpoint_continues_with_the_next():
    lengths = [3, 4, 5, 6]
    sampler = make_sampler("random", lengths, 2, seed=1)
    loader = rs.resumable_loader(DataLoader(CountingDataset(lengths), collate_fn=get_sft_collate_fn()), sampler, seed=1)
    resumed = rs.EpochBatches(loader, sampler, epoch=0, position=2)
    batch = next(resumed)
    assert (resumed.epoch, resumed.position) == (1, 1)
    expected = [CountingDataset(lengths).tokens[i] for i in sampler.batches(1)[0]]
    assert batch["input_ids"].shape[0] == 2 and torch.equal(batch["input_ids"][0][: len(expected[0])], expected[0])


# ---------------------------------------------------------------------------------------------------------------
# Bit-identical training: straight vs stopped, saved, rebuilt from disk and continued
# ---------------------------------------------------------------------------------------------------------------

LENGTHS = [5, 12, 7, 9, 3, 14, 6, 8, 10, 4, 11, 13, 6]  # 13 samples: 7 micro-batches of 2, so steps straddle epochs
MICRO_BATCH, ACCUMULATION, STEPS, SEED = 2, 2, 10, 1337


def build(kind: str):
    """Everything a run builds: model (seeded as the flow seeds it), optimizer, scheduler, loader, loss window."""
    torch.manual_seed(SEED)
    config = Config(
        n_layer=2,
        n_head=4,
        n_embd=32,
        block_size=32,
        vocab_size=64,
        padded_vocab_size=64,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.1,
        lora_query=True,
        lora_value=True,
        lora_mlp=True,
    )
    model = GPT(config)
    mark_only_lora_as_trainable(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    scheduler = get_lr_scheduler(optimizer, warmup_steps=2, max_steps=STEPS)
    sampler = make_sampler(kind, LENGTHS, MICRO_BATCH, SEED)
    loader = rs.resumable_loader(DataLoader(CountingDataset(LENGTHS), collate_fn=get_sft_collate_fn()), sampler, SEED)
    counts = {key: torch.tensor(0) for key in ("raw", "template", "padded")}
    return model, optimizer, scheduler, sampler, loader, RunningMean(window=ACCUMULATION), counts


def train(model, optimizer, scheduler, batches, running_loss, counts, step, iteration, until_step):
    """fit's loop, as finetune_lora runs it."""
    losses = []
    model.train()
    while step < until_step:
        iteration += 1
        batch = next(batches)
        logits = model(batch["input_ids"])
        loss = chunked_cross_entropy(logits[..., :-1, :], batch["labels"][..., 1:])
        (loss / ACCUMULATION).backward()
        running_loss.update(loss.detach())
        if iteration % ACCUMULATION == 0:
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            step += 1
            losses.append(running_loss.compute().item())
        counts["padded"] += batch["input_ids"].numel()
    return step, iteration, losses


def lora_tensors(model) -> dict:
    return {name: value for name, value in model.state_dict().items() if "lora_" in name}


@pytest.mark.parametrize("kind, stop_at", [("random", 3), ("random", 5), ("grouped", 4)])
def test_a_resumed_run_ends_bit_identical(tmp_path, kind, stop_at):
    """Stopped at step 3 (epoch 0), 4 (epoch 1, just past the boundary) or 5 (epoch 1), saved to disk, every object
    rebuilt, loaded, trained on to step 10 (epoch 2): every LoRA tensor equals the uninterrupted run's."""
    model, optimizer, scheduler, sampler, loader, running, counts = build(kind)
    straight_batches = rs.EpochBatches(loader, sampler)
    *_, straight_losses = train(model, optimizer, scheduler, straight_batches, running, counts, 0, 0, STEPS)
    assert straight_batches.epoch == 2
    expected, expected_counts = lora_tensors(model), int(counts["padded"])

    model, optimizer, scheduler, sampler, loader, running, counts = build(kind)
    batches = rs.EpochBatches(loader, sampler)
    step, iteration, first_losses = train(model, optimizer, scheduler, batches, running, counts, 0, 0, stop_at)
    header = rs.training_header(
        step, iteration, batches, 0.0, {"seed": SEED}, rs.data_fingerprint({"train": LENGTHS}), {}
    )
    step_dir = tmp_path / f"step-{step:06d}"
    rs.save_resumable_checkpoint(
        step_dir,
        lambda tmp: torch.save({"model": lora_tensors(model)}, tmp / rs.LORA_FILE),
        header,
        rs.rank_training_state(optimizer, scheduler, running, counts),
    )
    del model, optimizer, scheduler, sampler, loader, running, counts, batches
    torch.manual_seed(0), random.seed(0), np.random.seed(0)  # whatever the new process drew in the meantime

    chosen = rs.find_checkpoint(tmp_path, "auto", log=lambda _: None)
    saved = rs.read_header(chosen)
    rs.check_same_run(saved, {"run": {"seed": SEED}, "data": rs.data_fingerprint({"train": LENGTHS})})
    model, optimizer, scheduler, sampler, loader, running, counts = build(kind)
    rs.load_lora_weights(model, chosen)
    progress = saved["progress"]
    batches = rs.EpochBatches(loader, sampler, progress["epoch"], progress["position"])
    rs.restore_rank_training_state(rs.read_rank_state(chosen), optimizer, scheduler, running, counts)
    loader.dataset.reads.clear()
    *_, later_losses = train(
        model, optimizer, scheduler, batches, running, counts, progress["step"], progress["iteration"], STEPS
    )

    resumed = lora_tensors(model)
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[name], expected[name]) for name in expected)
    assert first_losses + later_losses == straight_losses
    assert int(counts["padded"]) == expected_counts
    every_batch = [batch for epoch in range(3) for batch in sampler.batches(epoch)]
    trained_on_after_resume = every_batch[progress["iteration"] : ACCUMULATION * STEPS]
    assert loader.dataset.reads == [i for batch in trained_on_after_resume for i in batch]  # nothing skipped was read


def test_without_the_rng_state_dropout_differs(tmp_path):
    """The reference test above could pass by accident if dropout drew nothing: restoring everything but the RNG
    makes the result differ."""
    model, optimizer, scheduler, sampler, loader, running, counts = build("random")
    train(model, optimizer, scheduler, rs.EpochBatches(loader, sampler), running, counts, 0, 0, 4)
    expected = lora_tensors(model)

    model, optimizer, scheduler, sampler, loader, running, counts = build("random")
    batches = rs.EpochBatches(loader, sampler)
    step, iteration, _ = train(model, optimizer, scheduler, batches, running, counts, 0, 0, 2)
    torch.manual_seed(123)
    train(model, optimizer, scheduler, batches, running, counts, step, iteration, 4)
    assert not all(torch.equal(value, expected[name]) for name, value in lora_tensors(model).items())


# ---------------------------------------------------------------------------------------------------------------
# Graceful stop
# ---------------------------------------------------------------------------------------------------------------

LOOP = """
import sys, time
sys.path.insert(0, {root!r})
import resume_state as rs
from pathlib import Path
out = Path(sys.argv[1])
with rs.GracefulStop() as stop:
    for step in range(1, 10_000):
        print("step", step, flush=True)
        time.sleep({step_seconds})  # the optimizer step
        if stop.requested:
            (out / f"step-{{step:06d}}").mkdir()
            print("To resume: " + rs.resume_command(["finetune_lora.py", "ckpt", "--resume", "false"], out / f"step-{{step:06d}}"), flush=True)
            sys.exit(stop.exit_code)
"""


def start_loop(tmp_path: Path, step_seconds: float) -> subprocess.Popen:
    script = tmp_path / "loop.py"
    script.write_text(LOOP.format(root=str(ROOT), step_seconds=step_seconds))
    process = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().startswith("step 1")
    return process


@pytest.mark.e2e
def test_a_second_ctrl_c_stops_at_once(tmp_path):
    process = start_loop(tmp_path, step_seconds=30)
    process.send_signal(signal.SIGINT)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=10)
    assert process.returncode in (-signal.SIGINT, 130)  # KeyboardInterrupt: Python ends by SIGINT
    assert not list(tmp_path.glob("step-*"))


def test_handlers_are_put_back():
    before = signal.getsignal(signal.SIGTERM)
    with rs.GracefulStop() as stop:
        assert signal.getsignal(signal.SIGTERM) == stop._handle
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested and stop.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) == before


# ---------------------------------------------------------------------------------------------------------------
# Two ranks (gloo on CPU): each saves and restores its own sampler share and random states
# ---------------------------------------------------------------------------------------------------------------

TWO_RANKS = """
import json, os, sys
sys.path.insert(0, {root!r})
import torch, torch.distributed as dist, torch.multiprocessing as mp
from torch.utils.data import DataLoader
from litgpt.data.base import get_sft_collate_fn
import resume_state as rs
sys.path.insert(0, {tests!r})
from test_resume_state import CountingDataset

LENGTHS = list(range(3, 14))  # 11 samples: the two ranks' shares pad to 12

def run(rank, out):
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    def pieces():
        dataset = CountingDataset(LENGTHS)
        sampler = rs.ResumableBatchSampler(lambda e: rs.random_batches(len(LENGTHS), 2, 5, e, rank, 2))
        return dataset, sampler, rs.resumable_loader(DataLoader(dataset, collate_fn=get_sft_collate_fn()), sampler, 5)
    def go_on(batches, n):
        seen = []
        for _ in range(n):
            batch = next(batches)
            seen.append([batch["input_ids"].shape[1], torch.rand(2).tolist()])  # a dropout-like draw per micro-batch
        return seen
    torch.manual_seed(100 + rank)
    dataset, sampler, loader = pieces()
    batches = rs.EpochBatches(loader, sampler)
    go_on(batches, 5)  # 3 micro-batches per epoch and rank: stops in epoch 2
    header = rs.training_header(5, 5, batches, 0.0, {{}}, {{}}, {{}})
    rs.save_training_state(out / "step-000005", {{**header, "lora_sha256": ""}}, {{"rng": rs.capture_rng()}}, rank, 2, dist.barrier)
    straight = go_on(batches, 4)

    torch.manual_seed(7)
    dataset, sampler, loader = pieces()
    progress = rs.read_header(out / "step-000005")["progress"]
    batches = rs.EpochBatches(loader, sampler, progress["epoch"], progress["position"])
    rs.restore_rng(rs.read_rank_state(out / "step-000005", rank)["rng"])
    resumed = go_on(batches, 4)
    epoch_0 = [i for batch in sampler.batches(0) for i in batch]
    (out / f"rank-{{rank}}.json").write_text(json.dumps({{"straight": straight, "resumed": resumed, "epoch_0": epoch_0,
                                                         "progress": progress, "reads": dataset.reads}}))
    dist.destroy_process_group()

if __name__ == "__main__":
    from pathlib import Path
    mp.spawn(run, args=(Path(sys.argv[1]),), nprocs=2)
"""


@pytest.mark.e2e
def test_two_ranks_resume_their_own_share_and_random_states(tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS.format(root=str(ROOT), tests=str(ROOT / "tests"), port=port))
    finished = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=120, check=False
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in range(2)]
    assert sorted(ranks[0]["epoch_0"] + ranks[1]["epoch_0"]) == sorted(list(range(11)) + [ranks[0]["epoch_0"][0]])
    for rank in ranks:
        assert rank["progress"]["epoch"] == 1 and rank["progress"]["position"] == 2
        assert rank["resumed"] == rank["straight"]
    assert ranks[0]["straight"] != ranks[1]["straight"]  # each rank its own data and its own random draws
    assert sorted(p.name for p in (tmp_path / "resume" / "step-000005").iterdir()) == [
        "rank-0.pt",
        "rank-1.pt",
        "state.json",
    ]
