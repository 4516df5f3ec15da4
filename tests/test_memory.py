"""The micro-batch that fits (``litgpt_seqlen.memory``): the sizes it may choose, the search over them, the optimizer's
state it allocates and drops, and real runs out of memory on this CPU: a process whose address space is limited
(``ulimit -v``) so that the user's micro-batch fails and a smaller one fits."""

import re
import resource
from contextlib import contextmanager

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import assets
from helpers import ROOT, cli_args, read_report, run_with_memory_limit
from litgpt_seqlen.memory import search
from litgpt_seqlen.memory.limits import address_space_in_use
from litgpt_seqlen.memory.sizes import largest_that_fits, micro_batch_sizes

MiB = 2**20

# --- the sizes and the search over them -------------------------------------------------------------------------


def test_the_sizes_keep_every_step_whole():
    assert micro_batch_sizes(16, 8) == [8, 4, 2, 1]
    assert micro_batch_sizes(12, 12) == [12, 6, 4, 3, 2, 1]
    assert micro_batch_sizes(12, 4) == [4, 3, 2, 1]  # 3 divides the step of 12 too
    assert micro_batch_sizes(8, 1) == [1]


@given(st.integers(1, 64), st.integers(1, 64))
def test_every_size_takes_the_same_samples_per_step(batch_size, upper):
    upper = min(upper, batch_size)
    step = batch_size // upper * upper
    sizes = micro_batch_sizes(batch_size, upper)
    assert sizes[0] == upper and sizes == sorted(sizes, reverse=True)
    assert all(step % size == 0 and batch_size // size * size == step for size in sizes)


@given(st.integers(1, 40), st.integers(0, 41))
def test_the_search_finds_the_largest_size_that_fits_in_few_tries(count, threshold):
    sizes = list(range(count, 0, -1))
    tried = []

    def fits(size):
        tried.append(size)
        return size <= threshold

    found = largest_that_fits(sizes, fits)
    assert found == (min(count, threshold) if threshold >= 1 else None)
    assert len(tried) == len(set(tried)) <= 2 + count.bit_length()


def test_a_batch_cut_to_a_shorter_length_keeps_its_packed_rows_consistent():
    batch = {
        "input_ids": torch.arange(12).reshape(2, 6),
        "labels": torch.arange(12).reshape(2, 6),
        "segment_lengths": [[2, 3, 1], [6]],
        "token_counts": {"raw": torch.ones(4, 1)},
    }
    cut = search.cut_batch(batch, 4)
    assert cut["input_ids"].tolist() == [[0, 1, 2, 3], [6, 7, 8, 9]] and cut["labels"].shape == (2, 4)
    assert cut["segment_lengths"] == [[2, 2], [4]]
    assert cut["token_counts"] is batch["token_counts"]


class _Fabric:
    world_size, global_rank, device = 1, 0, torch.device("cpu")


def test_the_optimizer_state_is_allocated_as_a_step_would_then_dropped_with_every_weight_unchanged():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    model[0].weight.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.5, weight_decay=0.1)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with search.optimizer_state_allocated(_Fabric(), optimizer):
        moments = [optimizer.state[p] for p in model.parameters() if p.requires_grad]
        assert all(m["exp_avg"].shape == m["exp_avg_sq"].shape for m in moments) and len(moments) == 3
        assert all(p.grad is None for p in model.parameters())
    assert not optimizer.state and optimizer.param_groups[0]["lr"] == 0.5
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_a_loaded_optimizer_state_is_left_as_it_is():
    parameter = torch.nn.Parameter(torch.ones(2))
    optimizer = torch.optim.AdamW([parameter], lr=0.1)
    parameter.grad = torch.ones(2)
    optimizer.step()
    saved = {key: value.clone() for key, value in optimizer.state[parameter].items()}
    with search.optimizer_state_allocated(_Fabric(), optimizer):
        pass
    assert all(torch.equal(saved[key], optimizer.state[parameter][key]) for key in saved)


# --- real runs out of memory ---------------------------------------------------------------------------------------

# A 2-layer GPT whose output layer has 32,768 columns: a micro-batch's logits (rows x ~420 tokens x 32,768 floats)
# dwarf the weights, so the memory a try needs grows with its size. Under BUDGET the worst train batch of 4 samples
# runs out of memory and one of 2 fits, the whole run included (measured: 2 is chosen and trains from about 450 to
# 560 MiB, 4 fits from about 600 MiB); GENEROUS fits 4.
BUDGET, GENEROUS = 500 * MiB, 2048 * MiB
TWO_RANKS_BUDGET = 590 * MiB  # on two ranks each process holds more (gloo, the sharding): 2 is chosen from 540 to 640
TRAIN, VAL = [400, 380, 390, 410, 300, 420, 405, 395], [400, 410]


@pytest.fixture(scope="module")
def wide_vocabulary(tmp_path_factory):
    """(checkpoint, data) of the runs below."""
    directory = tmp_path_factory.mktemp("wide-vocabulary")
    checkpoint, data = directory / "checkpoint", directory / "data"
    checkpoint.mkdir()
    assets.build_tokenizer(checkpoint)
    assets.build_checkpoint(checkpoint, block_size=512, padded_vocab_size=32_768)
    assets.build_data(data, checkpoint, TRAIN, VAL)
    return checkpoint, data


def arguments(checkpoint, data, out_dir, micro_batch_size, *extra, global_batch_size=8, steps=1):
    """One step of all 8 samples by default (no warmup), token weighting, no dropout (its masks follow the shapes)."""
    sizes = ("--train.micro_batch_size", str(micro_batch_size), "--train.global_batch_size", str(global_batch_size))
    same = ("--seq.loss_weighting", "token", "--lora_dropout", "0", "--train.lr_warmup_steps", "0")
    return [str(checkpoint), *cli_args(data, out_dir, *sizes, *same, *extra, steps=steps)]


def lora(out_dir):
    state = torch.load(out_dir / "final" / "lit_model.pth.lora", weights_only=True)
    return state.get("model", state)


@contextmanager
def address_space_limited(budget: int):
    """This process may allocate ``budget`` bytes more address space than it holds now, while inside."""
    previous = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (address_space_in_use() + budget, previous[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, previous)


@pytest.fixture
def one_thread():
    """Runs in this process with one thread, as the limited runs have (so their sums are the same, bit for bit)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.e2e
def test_out_of_memory_at_the_users_size_trains_at_a_smaller_one_on_the_same_samples(
    wide_vocabulary, tmp_path, cli_argv, one_thread
):
    checkpoint, data = wide_vocabulary
    shrunk, roomy = tmp_path / "shrunk", tmp_path / "roomy"
    done = run_with_memory_limit(tmp_path, BUDGET, arguments(checkpoint, data, shrunk, 4))
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        "Memory: micro-batch 4 does not fit on cpu; training with micro-batch 2 and 4 accumulation steps" in done.stdout
    )
    memory = read_report(shrunk)["memory"]
    assert memory["micro_batch_size"] == 2 and memory["accumulation"] == 4 and memory["margin"] == 0.1
    assert [(t["micro_batch_size"], t["fits"]) for t in memory["tried"]] == [(4, False), (2, True)]
    assert "can't allocate memory" in memory["tried"][0]["reason"] and 0 < memory["cpu_limit_bytes"] < BUDGET
    assert read_report(shrunk)["batches"]["micro_batch_size"] == 2
    with address_space_limited(GENEROUS):  # this process, for one run: it fits, and no size below is tried
        done = cli_argv(["finetune_lora.py", *arguments(checkpoint, data, roomy, 4)])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Memory: micro-batch 4 fits on cpu." in done.stdout and read_report(roomy)["memory"]["cpu_limit_bytes"]

    # Shrunk: the same as a run started at 2 without the search, bit for bit, and the same steps as at 4 (other sums).
    # Roomy (limited, in this process): the same as a run at 4 without the search, bit for bit.
    at_two, at_four = tmp_path / "two", tmp_path / "four"
    for out_dir, size in ((at_two, 2), (at_four, 4)):
        flags = arguments(checkpoint, data, out_dir, size, "--seq.fit_micro_batch", "false")
        assert cli_argv(["finetune_lora.py", *flags]).returncode == 0
    shrunk, roomy, two, four = lora(shrunk), lora(roomy), lora(at_two), lora(at_four)
    assert all(torch.equal(shrunk[name], two[name]) and torch.equal(roomy[name], four[name]) for name in two)
    assert all(torch.allclose(shrunk[name], four[name], rtol=1e-4, atol=1e-6) for name in four)
    assert not all(torch.equal(shrunk[name], four[name]) for name in four)  # other sums, other rounding


@pytest.mark.e2e
def test_when_not_even_one_sample_fits_the_run_stops_naming_a_length_that_would(wide_vocabulary, tmp_path):
    checkpoint, data = wide_vocabulary
    out_dir = tmp_path / "out"
    done = run_with_memory_limit(tmp_path, 150 * MiB, arguments(checkpoint, data, out_dir, 4))
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    message = done.stderr[done.stderr.index("error: ") :]
    assert "even at --train.micro_batch_size 1 with max_seq_length = " in message
    # docs/memory.md shows this run's message: its first line up to the device's words and its second line whole
    # (the length that fits, in the third, depends on the allocator and the limit)
    shown = (ROOT / "docs" / "memory.md").read_text().partition("\nerror: out of memory on cpu")[2].splitlines()
    in_files = re.sub(r"of \S*/data/train\.json", "of data/train.json", message)
    assert "error: out of memory on cpu" + shown[0].partition(": out of memory in the forward")[0] in in_files
    assert shown[1].startswith("The longest train samples: ") and shown[1] in in_files.splitlines()
    assert "can't allocate memory" in message  # what the device said the worst batch needed
    assert "What fits, by the same rehearsal: --train.max_seq_length " in message
    assert "--seq.pack true" in message and "--precision" in message
    written = {path.name for path in out_dir.rglob("*")}  # the report, nothing that looks like a trained run
    assert "seq_lengths.json" in written and not written & {"final", "resume", "hyperparameters.yaml"}
    assert not [name for name in written if name.startswith("step-") or name.startswith("lit_model")]


@pytest.mark.e2e
def test_one_rank_out_of_memory_shrinks_both(wide_vocabulary, tmp_path):
    """Only rank 1 is limited; rank 0 has room for 4. Both agree on 2 (a rank at 4 and one at 2 would not meet in
    the same collectives: the run would hang or fail), and nothing waits for good."""
    checkpoint, data = wide_vocabulary
    out_dir = tmp_path / "out"
    flags = arguments(checkpoint, data, out_dir, 4, "--devices", "2")
    done = run_with_memory_limit(tmp_path, TWO_RANKS_BUDGET, flags, limited_rank="1", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        "Memory: micro-batch 4 does not fit on cpu; training with micro-batch 2 and 2 accumulation steps" in done.stdout
    )
    report = read_report(out_dir)
    assert [(t["micro_batch_size"], t["fits"]) for t in report["memory"]["tried"]] == [(4, False), (2, True)]
    assert report["batches"]["micro_batch_size"] == 2 and report["batches"]["count"] == 1 * 2 * 2  # steps, accum, ranks


@pytest.mark.e2e
def test_a_resume_where_the_saved_size_no_longer_fits_goes_on_smaller_and_says_so(wide_vocabulary, tmp_path, cli_argv):
    """Packed rows, whose search is the same over rows: a run at 4 rows per micro-batch, then a resume from its first
    step where only 2 fit."""
    checkpoint, data = wide_vocabulary
    out_dir = tmp_path / "out"
    flags = arguments(checkpoint, data, out_dir, 4, "--seq.pack", "true", "--train.save_interval", "1", steps=2)
    done = cli_argv(["finetune_lora.py", *flags, "--train.global_batch_size", "4"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert read_report(out_dir)["memory"]["micro_batch_size"] == 4
    uninterrupted = lora(out_dir)
    flags += ["--train.global_batch_size", "4", "--resume", str(out_dir / "step-000001")]
    resumed = run_with_memory_limit(tmp_path, BUDGET, flags)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (
        "The checkpoint trained with micro-batch 4, which does not fit here: going on with 2 from step 1"
        in resumed.stdout
    )
    assert "not bit-identical" in resumed.stdout
    report = read_report(out_dir)
    assert report["batches"]["packed"] and report["batches"]["micro_batch_size"] == 2
    assert [(t["micro_batch_size"], t["fits"]) for t in report["memory"]["tried"]] == [(4, False), (2, True)]
    assert report["rehearsal"]["train_batch"][0] == 2  # rows
    again = lora(out_dir)  # the same rows in the same steps: equal up to float rounding
    assert all(torch.allclose(again[name], value, rtol=1e-4, atol=1e-6) for name, value in uninterrupted.items())
