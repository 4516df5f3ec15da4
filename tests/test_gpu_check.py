"""bench/gpu_check.py (`make gpu-check`): skipped with a clear line and JSON without CUDA, its parts' plain logic, and
(slow) every part end to end on the CPU with the tiny model."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from helpers import ROOT


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


gpu_check = load("gpu_check")
gpu_orders = load("gpu_orders")


def run_check(tmp_path, *flags: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "result" / "gpu_check.json"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")  # no CUDA, even on a machine with one
    command = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--out", str(out), *flags]
    ran = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    return ran, json.loads(out.read_text()) if out.is_file() else {}


@pytest.mark.e2e  # runs the script in a subprocess (torch imported there: a second)
def test_without_cuda_it_exits_0_and_writes_why_it_skipped(tmp_path):
    ran, result = run_check(tmp_path)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert "skipped: no CUDA device" in ran.stdout and "written: " in ran.stdout
    assert result["status"] == "skipped" and result["reason"] == "no CUDA device"
    assert result["device"]["cuda_available"] is False and result["device"]["torch"]


def test_force_cpu_asks_for_the_tiny_model():
    with pytest.raises(SystemExit) as leaving:
        gpu_check.main(["--force-cpu"])
    assert leaving.value.code == 2


def test_the_cuda_tests_are_found_by_their_marker():
    assert "tests/test_packed_attention.py" in gpu_check.cuda_test_files()
    assert gpu_check.CUDA_MARKER in (ROOT / "pyproject.toml").read_text()


def test_junit_counts(tmp_path):
    report = tmp_path / "junit.xml"
    report.write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" errors="1" failures="1" skipped="2" tests="7">'
        "</testsuite></testsuites>"
    )
    assert gpu_check.junit_counts(report) == {"passed": 3, "failed": 1, "errors": 1, "skipped": 2}


def test_a_failing_part_is_recorded_and_the_next_one_runs():
    parts = {}
    gpu_check.guarded("broken", lambda: 1 / 0, parts)
    gpu_check.guarded("fine", lambda: {"status": "ok"}, parts)
    assert parts["broken"]["status"] == "error" and "ZeroDivisionError" in parts["broken"]["error"]
    assert "Traceback" in parts["broken"]["traceback"]
    assert parts["fine"]["status"] == "ok"


def test_the_lengths_are_long_tailed_and_exact_at_the_top():
    lengths = gpu_orders.long_tailed_lengths(1024, 1800)
    assert len(lengths) == 1024 and max(lengths) == lengths[-1] == 1800
    assert min(lengths) >= gpu_orders.SHORTEST
    ordered = sorted(lengths)
    assert ordered[512] < 300 < 900 < ordered[-3]  # most samples short, a few several times the median
    assert lengths == gpu_orders.long_tailed_lengths(1024, 1800)


def test_the_orders_are_the_flags_the_command_line_knows():
    from litgpt_seqlen.args import SeqArgs

    assert SeqArgs(group_by_length=True).order == "grouped" and SeqArgs(pack=True).order == "packed"
    assert gpu_orders.ORDERS == {
        "random": [],
        "grouped": ["--seq.group_by_length", "true"],
        "packed": ["--seq.pack", "true"],
    }


def test_a_run_is_read_from_its_performance_report_and_seq_lengths(tmp_path):
    batches = {"count": 10, "samples": 40, "rows": 40, "real_tokens": 3000, "padded_tokens": 6000}
    batches.update(efficiency=0.5, attention=None)
    report = {"max_seq_length": 440, "batches": batches, "rehearsal": {"peak_memory_bytes": 123}}
    (tmp_path / "seq_lengths.json").write_text(json.dumps(report))
    stdout = "| - Training Time             :  2.00 s\n| - Tok/sec                   :  3000.00 tok/s\n"
    stdout += "| - Memory Used               :  4.50 GB\n"
    run = gpu_orders.read_run(stdout, tmp_path)
    assert run["real_tokens_per_second"] == 1500 and run["samples_per_second"] == 20
    assert (run["train_seconds"], run["memory_used_gb"], run["rehearsal_peak_memory_bytes"]) == (2.0, 4.5, 123)
    with pytest.raises(RuntimeError, match="no performance report"):
        gpu_orders.read_run("Epoch 1 | iter 1", tmp_path)
    runs = {"random": {"real_tokens_per_second": 100.0}, "packed": {"real_tokens_per_second": 180.0}}
    runs["grouped"] = {"status": "error"}
    assert gpu_orders.speedups(runs) == {"random": 1.0, "packed": 1.8}


@pytest.mark.slow
@pytest.mark.e2e
def test_every_part_runs_on_the_cpu_with_the_tiny_model(tmp_path):
    """The train orders' code path end to end (three runs of finetune_lora.py), the CUDA tests found and skipped."""
    ran, result = run_check(tmp_path, "--tiny", "--force-cpu", "--work-dir", str(tmp_path / "work"), timeout=300)
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    assert result["status"] == "ok" and result["failed_parts"] == [] and result["device_type"] == "cpu"
    parts = result["parts"]
    assert parts["cuda_tests"]["skipped"] == 4 and parts["cuda_tests"]["passed"] == 0
    memory = parts["memory_search"]  # on the CPU only the uncapped run: the cap is CUDA's
    assert memory["status"] == "ok" and memory["uncapped"]["memory"]["micro_batch_size"] == 8
    orders = parts["train_orders"]
    runs = orders["runs"]
    assert list(runs) == ["random", "grouped", "packed"] and all(run["status"] == "ok" for run in runs.values())
    # the same epoch: every sample, and the few repeated to fill its last step (whole steps in every order)
    assert all(run["real_tokens"] >= orders["data"]["train_tokens"] for run in runs.values())
    assert all(0 <= run["samples"] - orders["data"]["train_samples"] < 16 for run in runs.values())
    assert (
        runs["packed"]["attention"] == "segments" and runs["packed"]["micro_batches"] < runs["random"]["micro_batches"]
    )
    assert runs["grouped"]["efficiency"] > runs["random"]["efficiency"]
    assert orders["real_tokens_per_second_over_random"]["random"] == 1.0
    assert "real tok/s" in ran.stdout and "cuda tests: ok: 0 passed" in ran.stdout
