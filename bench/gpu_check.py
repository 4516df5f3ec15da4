"""The checks only a GPU can make, in one command (`make gpu-check`), written to one JSON file with a short summary.

    python bench/gpu_check.py [--out gpu_check.json] [--tiny] [--force-cpu] [--work-dir DIR] [--budget 280]

Four parts, each guarded (a part that fails is recorded with its error and the others still run):

* ``cuda_tests``: the suite's tests marked ``cuda`` (skipped without a CUDA device), run with pytest in a subprocess;
* ``memory_search``: the micro-batch search under a CUDA memory cap (``bench/gpu_memory.py``);
* ``train_orders``: tokens per second of the three train orders (random, grouped, packed) through ``finetune_lora.py``
  on a random-weight model of about 1B parameters (``bench/gpu_orders.py``; ``--tiny``: a 2-layer one);
* ``device``: the device, its memory, and the torch, CUDA and litgpt versions.

Without a CUDA device it writes ``{"status": "skipped", "reason": "no CUDA device"}`` and exits 0, unless
``--force-cpu`` (with ``--tiny``) runs every part on the CPU: the code path, not a measurement. Exit status: 0 when
every part passed or was skipped, 1 when one failed (the JSON says which and why).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CUDA_MARKER = "cuda"  # pyproject.toml's marker for the tests a CUDA device runs


def device_info() -> dict:
    """The device and the versions the results depend on."""
    import torch

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "litgpt": metadata.version("litgpt"),
        "lightning": metadata.version("lightning"),
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info.update(
            name=properties.name,
            total_memory_bytes=properties.total_memory,
            capability=f"{properties.major}.{properties.minor}",
            device_count=torch.cuda.device_count(),
            cudnn=torch.backends.cudnn.version(),
            driver=nvidia_smi("driver_version"),
        )
    else:
        info.update(name=platform.processor() or platform.machine(), cpu_count=os.cpu_count())
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    info["commit"] = commit.stdout.strip() or None
    return {"status": "ok", **info}


def nvidia_smi(field: str) -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    ran = subprocess.run(
        ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True, text=True
    )
    return ran.stdout.strip().splitlines()[0] if ran.returncode == 0 and ran.stdout.strip() else None


def cuda_test_files() -> list[str]:
    """The test modules that use the ``cuda`` marker (so pytest collects only those)."""
    return [
        str(path.relative_to(ROOT))
        for path in sorted((ROOT / "tests").glob("test_*.py"))
        if f"pytest.mark.{CUDA_MARKER}" in path.read_text()
    ]


def junit_counts(path: Path) -> dict:
    """passed / failed / errors / skipped from pytest's JUnit XML."""
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    tests, failed, errors, skipped = (int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped"))
    return {"passed": tests - failed - errors - skipped, "failed": failed, "errors": errors, "skipped": skipped}


def cuda_tests(env: dict, timeout: float, cuda: bool) -> dict:
    """The ``cuda``-marked tests in a pytest subprocess: counts, exit code and the tail of the output. With a CUDA
    device, a skipped one fails the part (it skips only without one)."""
    files = cuda_test_files()
    if not files:
        return {"status": "failed", "error": f"no test module uses pytest.mark.{CUDA_MARKER}"}
    with tempfile.TemporaryDirectory() as scratch:
        junit = Path(scratch) / "junit.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "-m", CUDA_MARKER]
        command += [f"--junitxml={junit}", *files]
        started = time.perf_counter()
        try:
            ran = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "error": f"timed out after {timeout:.0f} s", "command": command}
        result = {"command": ["pytest", "-m", CUDA_MARKER, *files], "returncode": ran.returncode}
        result["seconds"] = round(time.perf_counter() - started, 2)
        result["output_tail"] = (ran.stdout + ran.stderr)[-4000:]
        if not junit.is_file():
            return {"status": "failed", "error": "pytest wrote no report", **result}
        result.update(junit_counts(junit))
    collected = result["passed"] + result["failed"] + result["errors"] + result["skipped"]
    ok = ran.returncode == 0 and collected > 0 and not (result["failed"] or result["errors"])
    if cuda and result["skipped"]:
        ok, result["error"] = False, "skipped on a CUDA device"
    return {"status": "ok" if ok else "failed", **result}


def memory_search_check(work_dir: Path | None, cuda: bool) -> dict:
    """The memory search under a CUDA memory cap (``bench/gpu_memory.py``): micro-batch 8 uncapped, then capped at
    60% of its peak, where a smaller size must be chosen."""
    import gpu_memory

    work = Path(tempfile.mkdtemp(prefix="gpu_memory_")) if work_dir is None else work_dir / "memory"
    work.mkdir(parents=True, exist_ok=True)
    try:
        return gpu_memory.memory_search(work, cuda)
    finally:
        if work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


def train_orders(work_dir: Path | None, tiny: bool, cuda: bool, deadline: float) -> dict:
    import gpu_orders

    work = Path(tempfile.mkdtemp(prefix="gpu_check_")) if work_dir is None else work_dir
    work.mkdir(parents=True, exist_ok=True)
    try:
        return gpu_orders.compare_orders(work, tiny, cuda, deadline)
    finally:
        if work_dir is None:
            shutil.rmtree(work, ignore_errors=True)


def guarded(name: str, part, results: dict) -> None:
    """Runs ``part()`` into ``results[name]``; an exception is recorded there, with its traceback's tail."""
    started = time.perf_counter()
    print(f"[gpu-check] {name} ...", flush=True)
    try:
        results[name] = part()
    except Exception as failed:  # recorded: the other parts still run
        results[name] = {"status": "error", "error": repr(failed), "traceback": traceback.format_exc()[-4000:]}
    results[name]["part_seconds"] = round(time.perf_counter() - started, 2)
    print(f"[gpu-check] {name}: {results[name]['status']} ({results[name]['part_seconds']} s)", flush=True)


def run_parts(args, cuda: bool) -> dict:
    started = time.monotonic()
    deadline = started + args.budget
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if not cuda:
        env["CUDA_VISIBLE_DEVICES"] = ""  # --force-cpu: the subprocesses see no GPU either
    parts: dict[str, dict] = {}
    guarded("device", device_info, parts)
    guarded("cuda_tests", lambda: cuda_tests(env, max(30.0, min(150.0, deadline - time.monotonic())), cuda), parts)
    guarded("memory_search", lambda: memory_search_check(args.work_dir, cuda), parts)
    guarded("train_orders", lambda: train_orders(args.work_dir, args.tiny, cuda, deadline), parts)
    return parts


def summary(result: dict) -> list[str]:
    """The lines printed at the end: one per part, one per train order."""
    if result["status"] == "skipped":
        return [f"skipped: {result['reason']}"]
    parts = result["parts"]
    device = parts["device"]
    lines = [f"device: {device.get('name')}, torch {device.get('torch')}, CUDA {device.get('cuda_runtime')}"]
    tests = parts["cuda_tests"]
    counts = ", ".join(f"{tests.get(key, 0)} {key}" for key in ("passed", "failed", "errors", "skipped"))
    lines.append(f"cuda tests: {tests['status']}: {counts}" + (f" ({tests['error']})" if "error" in tests else ""))
    memory = parts["memory_search"]
    capped = (memory.get("capped") or {}).get("printed") or memory.get("error", "")
    lines.append(f"memory search: {memory['status']}" + (f": {capped}" if capped else ""))
    orders = parts["train_orders"]
    lines.append(f"train orders: {orders['status']}" + (f" ({orders['error']})" if "error" in orders else ""))
    if "model" in orders:
        model = orders["model"]
        lines.append(f"  model {model['name']}: {model['parameters']:,} parameters, {model['dtype']}")
    for order, run in orders.get("runs", {}).items():
        if run["status"] != "ok":
            lines.append(f"  {order:8} {run['status']}: {run['error']}")
            continue
        ratio = orders["real_tokens_per_second_over_random"].get(order)
        lines.append(
            f"  {order:8} {run['real_tokens_per_second']:>10,.0f} real tok/s ({ratio}x random),"
            f" {run['padded_tokens_per_second']:>10,.0f} padded tok/s, efficiency {run['efficiency']:.1%},"
            f" {run['micro_batches']} micro-batches in {run['train_seconds']:.1f} s"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "gpu_check.json", help="the JSON file written")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model, 48 samples: seconds, on a CPU too")
    parser.add_argument(
        "--force-cpu", action="store_true", help="without CUDA, run every part on the CPU (with --tiny)"
    )
    parser.add_argument("--work-dir", type=Path, help="where the model, data and runs go, kept (default: a temp dir)")
    parser.add_argument("--budget", type=float, default=280, help="seconds the parts may take, all together")
    args = parser.parse_args(argv)
    if args.force_cpu and not args.tiny:
        parser.error("--force-cpu trains on the CPU: add --tiny (the 1B model would take hours there)")
    if args.force_cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # this process reports and builds on the CPU too
    import torch

    cuda = torch.cuda.is_available() and not args.force_cpu
    result = {"started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "tiny": args.tiny}
    started = time.perf_counter()
    if not cuda and not args.force_cpu:
        result.update(status="skipped", reason="no CUDA device", device=device_info())
    else:
        sys.path.insert(0, str(ROOT / "bench"))
        result["parts"] = run_parts(args, cuda)
        failed = [name for name, part in result["parts"].items() if part["status"] in ("failed", "error")]
        result.update(status="failed" if failed else "ok", failed_parts=failed, device_type="cuda" if cuda else "cpu")
    result["seconds"] = round(time.perf_counter() - started, 2)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("\n".join(summary(result)))
    print(f"written: {args.out}")
    return 1 if result["status"] == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
