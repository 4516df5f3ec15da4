"""The out_dir lock, the report-file hygiene between runs, and the exits a user sees (error, Ctrl-C, SIGTERM)."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from helpers import ROOT
from litgpt_seqlen import ranks
from litgpt_seqlen.errors import UserInputError
from litgpt_seqlen.exits import user_facing
from litgpt_seqlen.out_dir import earlier_runs, lock


def test_second_run_into_a_locked_out_dir_stops_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    with lock.hold_out_dir(out):
        with pytest.raises(lock.OutDirInUse) as raised:
            with lock.hold_out_dir(out):
                pass
    message = str(raised.value)
    assert (
        str(out) in message and f"pid {os.getpid()}" in message and "started 20" in message and "--out_dir" in message
    )


def test_released_on_an_exception(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), lock.hold_out_dir(out):
        assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
        raise RuntimeError("boom")
    assert not (out / ".lock").exists()
    with lock.hold_out_dir(out):  # free again
        pass


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    pid = dead_pid()
    (out / ".lock").write_text(
        json.dumps({"pid": pid, "host": socket.gethostname(), "started": "2025-01-01T00:00:00+00:00"})
    )
    said = []
    with lock.hold_out_dir(out, warn=said.append):
        assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
    assert (
        len(said) == 1 and f"pid {pid}" in said[0] and "no longer running" in said[0] and said[0].startswith("warning:")
    )


def test_ranks_above_zero_hold_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert not ranks.launched_as_rank_zero()
    out = tmp_path / "out"
    with (
        lock.hold_out_dir(out, enabled=ranks.launched_as_rank_zero()),
        lock.hold_out_dir(out, enabled=False),
    ):
        assert not (out / ".lock").exists()
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert ranks.launched_as_rank_zero()
    monkeypatch.setenv("RANK", "3")
    assert not ranks.launched_as_rank_zero()


@pytest.mark.e2e
def test_lock_held_by_another_process_and_released_when_it_is_killed(tmp_path):
    """Another process holds the lock: refused, naming its pid. It is killed (-9, no cleanup): taken over with a warning."""
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from litgpt_seqlen.out_dir import lock\n"
            f"with lock.hold_out_dir(__import__('pathlib').Path({str(out)!r})):\n print('held', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(lock.OutDirInUse, match=f"pid {holder.pid}"):
            with lock.hold_out_dir(out):
                pass
    finally:
        holder.kill()
        holder.wait()
    said = []
    with lock.hold_out_dir(out, warn=said.append):
        pass
    assert len(said) == 1 and f"pid {holder.pid}" in said[0] and "no longer running" in said[0]


@pytest.mark.e2e
def test_a_process_the_holder_forked_neither_keeps_the_lock_nor_frees_it(tmp_path):
    """The scan's pool is forked while the lock is held: a forked child ending leaves the lock held, and a child
    still running when the holder is killed (-9) does not keep the out_dir locked."""
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import os, pathlib, sys, time
                sys.path.insert(0, {str(ROOT)!r})
                from litgpt_seqlen.out_dir import lock
                with lock.hold_out_dir(pathlib.Path({str(out)!r})):
                    if os.fork() == 0:
                        os._exit(0)  # a child that ends at once
                    os.wait()
                    if os.fork() == 0:  # a child that outlives the holder
                        print(os.getpid(), flush=True)
                        time.sleep(60)
                        os._exit(0)
                    time.sleep(60)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    child = int(holder.stdout.readline())
    try:
        with pytest.raises(lock.OutDirInUse, match=f"pid {holder.pid}"):  # still held after the first child ended
            with lock.hold_out_dir(out):
                pass
    finally:
        holder.kill()
        holder.wait()
    try:
        said = []
        with lock.hold_out_dir(out, warn=said.append):  # the second child still runs
            os.kill(child, 0)
        assert len(said) == 1 and f"pid {holder.pid}" in said[0]
    finally:
        os.kill(child, signal.SIGKILL)


# ---------------------------------------------------------------------------------------------------------------
# Report files
# ---------------------------------------------------------------------------------------------------------------


def make_trained_run(out, report=None):
    (out / "final").mkdir(parents=True)
    (out / "final" / "lit_model.pth.lora").write_bytes(b"weights")
    (out / "final" / "hyperparameters.yaml").write_text("{}")  # litgpt's scripts write it for every method
    (out / "seq_lengths.json").write_text(json.dumps(report or {"max_seq_length": 521}))


def test_dry_run_beside_a_trained_run_writes_its_own_report(tmp_path):
    out = tmp_path / "out"
    make_trained_run(out)
    (out / "dropped_samples.jsonl").write_text("{}\n")
    files = earlier_runs.report_files(out, dry_run=True, drop=True)
    assert files.report == out / "seq_lengths.dry_run.json" and files.dropped == out / "dropped_samples.dry_run.jsonl"
    assert files.removed == [] and "seq_lengths.dry_run.json" in files.note
    assert json.loads((out / "seq_lengths.json").read_text()) == {"max_seq_length": 521}  # the trained run's, untouched
    assert (out / "dropped_samples.jsonl").exists()


def test_dry_run_into_a_fresh_or_dry_out_dir_writes_the_report(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    assert earlier_runs.report_files(out, dry_run=True, drop=False).report == out / "seq_lengths.json"
    (out / "seq_lengths.json").write_text(json.dumps({"dry_run": True}))
    assert earlier_runs.report_files(out, dry_run=True, drop=False).report == out / "seq_lengths.json"


def test_trained_report_alone_counts_as_a_trained_run(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "seq_lengths.json").write_text(json.dumps({"max_seq_length": 128}))
    assert earlier_runs.report_files(out, dry_run=True, drop=False).report == out / "seq_lengths.dry_run.json"


def test_training_run_removes_what_it_will_not_rewrite(tmp_path):
    out = tmp_path / "out"
    make_trained_run(out)
    for name in ("dropped_samples.jsonl", "seq_lengths.dry_run.json", "dropped_samples.dry_run.jsonl"):
        (out / name).write_text("{}\n")
    files = earlier_runs.report_files(out, dry_run=False, drop=False)
    assert files.report == out / "seq_lengths.json" and files.dropped is None and files.note is None
    assert sorted(p.name for p in files.removed) == [
        "dropped_samples.dry_run.jsonl",
        "dropped_samples.jsonl",
        "seq_lengths.dry_run.json",
    ]
    assert sorted(p.name for p in out.iterdir()) == ["final", "seq_lengths.json"]


def test_training_run_under_drop_keeps_the_dropped_file_it_rewrites(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "dropped_samples.jsonl").write_text("{}\n")
    files = earlier_runs.report_files(out, dry_run=False, drop=True)
    assert files.dropped == out / "dropped_samples.jsonl" and files.removed == []


def test_earlier_checkpoints(tmp_path):
    out = tmp_path / "out"
    make_trained_run(out)
    (out / "step-000002").mkdir()
    (out / "step-000002" / "lit_model.pth").write_bytes(b"w")  # a full fine-tuning's checkpoint
    (out / "step-000002" / "hyperparameters.yaml").write_text("{}")
    (out / "step-000004").mkdir()  # empty: not a checkpoint
    assert earlier_runs.earlier_checkpoints(out) == ["final", "step-000002"]


# ---------------------------------------------------------------------------------------------------------------
# Exits
# ---------------------------------------------------------------------------------------------------------------


def exit_of(body, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as leaving, user_facing.user_facing_exits():
        body()
    return leaving.value.code, capsys.readouterr().err


def raise_(problem):
    raise problem


def test_user_error_is_one_line_and_exit_2(capsys):
    assert exit_of(lambda: raise_(UserInputError("the val split is empty")), capsys) == (
        2,
        "error: the val split is empty\n",
    )


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    assert exit_of(lambda: raise_(KeyboardInterrupt()), capsys) == (130, "interrupted (Ctrl-C)\n")


def test_sigterm_runs_finally_blocks_and_exits_143(capsys, tmp_path):
    out = tmp_path / "out"

    def body():
        with lock.hold_out_dir(out):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)

    assert exit_of(body, capsys) == (143, "terminated (SIGTERM)\n")
    assert not (out / ".lock").exists()  # released by the finally block
    assert signal.getsignal(signal.SIGTERM) is not user_facing._terminate  # put back


def test_only_rank_zero_prints(capsys, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert exit_of(lambda: raise_(UserInputError("bad")), capsys) == (2, "")
    assert exit_of(lambda: raise_(KeyboardInterrupt()), capsys) == (130, "")


@pytest.mark.e2e
def test_a_rank_left_waiting_for_one_that_ended_says_one_line_not_the_collectives_traceback(tmp_path):
    """Two real gloo ranks: rank 1 ends, rank 0's next collective fails; rank 0 says so in one line, exit 1."""
    script = tmp_path / "peer_lost.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, sys
            sys.path.insert(0, {str(ROOT)!r})
            import torch, torch.distributed as dist
            from litgpt_seqlen.exits import user_facing
            rank = 1 if os.fork() == 0 else 0
            dist.init_process_group("gloo", init_method="file://{tmp_path / "store"}", rank=rank, world_size=2)
            dist.barrier()
            if rank == 1:
                os._exit(0)  # killed, or its own error already printed
            with user_facing.user_facing_exits():
                dist.all_reduce(torch.ones(1))
            """
        )
    )
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr[-3000:]
    assert result.stderr.startswith("error: another rank of this run ended while this one waited for it (")
    assert "--resume auto" in result.stderr


def test_a_runtime_error_that_is_not_a_lost_rank_keeps_its_traceback():
    with pytest.raises(RuntimeError, match="shape mismatch"), user_facing.user_facing_exits():
        raise RuntimeError("shape mismatch")


def test_agree_on_error_with_one_rank():
    from types import SimpleNamespace

    ranks.agree_on_error(SimpleNamespace(world_size=1), None)
    with pytest.raises(UserInputError, match="mine"):
        ranks.agree_on_error(SimpleNamespace(world_size=1), UserInputError("mine"))


@pytest.mark.e2e
def test_ctrl_c_with_a_forked_pool_is_one_line(tmp_path):
    """The terminal sends SIGINT to the whole process group: pool workers ignore it, the main process says one line."""
    script = textwrap.dedent(
        f"""
        import multiprocessing, sys, time
        sys.path.insert(0, {str(ROOT)!r})
        from litgpt_seqlen.exits import user_facing
        from litgpt_seqlen.data import scan
        with user_facing.user_facing_exits():
            with multiprocessing.get_context("fork").Pool(2, initializer=scan.start_worker) as pool:
                result = pool.map_async(time.sleep, [30, 30])
                print("ready", flush=True)
                result.get()
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert process.stdout.readline().strip() == "ready"
    time.sleep(0.5)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C does
    _, err = process.communicate(timeout=30)
    assert (process.returncode, err) == (130, "interrupted (Ctrl-C)\n")
