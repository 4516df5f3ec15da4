"""The house: what is installed, who imports whom (imports inside functions included), and how large the rooms are."""

import ast
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import assets
from helpers import ROOT

PACKAGE = "litgpt_seqlen"
TOP_MODULES = ("finetune_lora", "data_utils")


def project_files() -> dict[str, Path]:
    """Every project module by dotted name: the two top-level modules and the package."""
    found = {name: ROOT / f"{name}.py" for name in TOP_MODULES}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The project modules ``path`` imports anywhere in it (module level or inside a function)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # `from pkg import name`: the module, or the package holding it
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = project_files()
    graph = {name: imports_of(path, set(files)) - {name} for name, path in files.items()}
    for name in graph:  # importing a.b.c runs a/__init__ and a/b/__init__ first: not an edge that matters here
        graph[name] = {other for other in graph[name] if not name.startswith(other + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_cycle_finder_finds_one_through_an_import_inside_a_function(tmp_path):
    a = tmp_path / "a.py"
    a.write_text("import b\n")
    b = tmp_path / "b.py"
    b.write_text("def f():\n    from a import thing\n")
    graph = {"a": imports_of(a, {"a", "b"}), "b": imports_of(b, {"a", "b"})}
    assert find_cycle(graph) == ["a", "b", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_the_projects_modules():
    graph = import_graph()
    assert len(graph) > 20 and graph["finetune_lora"]  # the walk saw the package
    assert find_cycle(graph) is None


def test_data_utils_is_a_leaf_of_the_standard_library():
    tree = ast.parse((ROOT / "data_utils.py").read_text())
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name).partition(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    assert imported <= set(sys.stdlib_module_names), imported - set(sys.stdlib_module_names)
    assert "os" not in imported and "multiprocessing" not in imported  # no environment, no process pool
    calls = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert "open" not in calls  # no file written or read


def test_no_package_module_imports_the_entry_point():
    graph = import_graph()
    assert not [name for name, imported in graph.items() if name != "finetune_lora" and "finetune_lora" in imported]


def function_sizes(path: Path) -> dict[str, int]:
    return {
        node.name: node.end_lineno - node.lineno + 1
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
    }


# The size limits (docs/architecture.md quotes them): lines per module and per function, finetune_lora's own apart.
MODULE_LINES, ENTRY_MODULE_LINES = 400, 450
FUNCTION_LINES, ENTRY_FUNCTION_LINES = 80, {"fit": 120, "main": 90}


def test_rooms_stay_small():
    for name, path in project_files().items():
        lines = len(path.read_text().splitlines())
        assert lines <= (ENTRY_MODULE_LINES if name == "finetune_lora" else MODULE_LINES), f"{path} has {lines} lines"
        for function, size in function_sizes(path).items():
            limit = ENTRY_FUNCTION_LINES.get(function, FUNCTION_LINES) if name == "finetune_lora" else FUNCTION_LINES
            assert size <= limit, f"{name}.{function} has {size} lines"


@pytest.mark.e2e
def test_the_wheel_holds_the_two_modules_the_package_and_the_console_command(tmp_path):
    source = tmp_path / "source"  # a copy of what the project ships: the build leaves nothing in the work tree
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "finetune_lora.py", "data_utils.py"):
        shutil.copy(ROOT / name, source)
    shutil.copytree(ROOT / PACKAGE, source / PACKAGE, ignore=shutil.ignore_patterns("__pycache__"))
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    assert top == {"finetune_lora.py", "data_utils.py", PACKAGE}
    assert not [name for name in names if "tests/" in name or "assets" in name]
    (entry_points,) = [name for name in names if name.endswith(".dist-info/entry_points.txt")]
    assert "litgpt-seqlen = finetune_lora:cli" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.e2e
def test_the_console_command_runs_beside_a_users_own_data_utils(tmp_path):
    command = Path(sys.executable).parent / "litgpt-seqlen"  # installed by `make venv` (pip install -e .)
    assert command.is_file(), "the project is not installed in this environment: run `make venv`"
    (tmp_path / "data_utils.py").write_text("raise ImportError('the user module, not ours')\n")
    assets.build_demo(tmp_path / "demo")
    flags = ["--data", "JSON", "--data.json_path", "demo/data", "--data.num_workers", "0", "--out_dir", "out"]
    ran = subprocess.run(  # a dry run: it imports, scans and decides through our data_utils, not the user's
        [str(command), "demo/checkpoint", *flags, "--seq.dry_run", "true"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "seq_lengths.json").read_text())["max_seq_length"] > 0


def room_table() -> dict[str, set[str]]:
    """docs/architecture.md's room table: each room's path -> the rooms (by short name) it may import."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    table = text.partition("## The rooms")[2].partition("Rules that keep it so")[0]
    rooms = {}
    for line in table.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            allowed = set(re.findall(r"`([\w.]+)`", cells[2]))
            rooms[cells[0].strip("`")] = {"*"} if cells[2] == "every room" else allowed
    return rooms


def room_of(module: str, rooms: dict) -> str | None:
    """The room (a path of the table) a dotted module lies in."""
    path = module.replace(".", "/")
    for room in rooms:
        if room.endswith("/") and (path + "/").startswith(room):
            return room
        if room == f"{path}.py":
            return room
    return None


def short_name(room: str) -> str:
    return room.removeprefix(f"{PACKAGE}/").removesuffix("/").removesuffix(".py")


def test_the_architecture_page_holds_the_rooms_and_their_imports():
    rooms = room_table()
    assert len(rooms) >= 10 and "finetune_lora.py" in rooms and f"{PACKAGE}/methods/" in rooms
    for room in rooms:  # every room listed exists
        assert (ROOT / room).exists(), f"docs/architecture.md lists {room}, which does not exist"
    for name in rooms.values():  # every room it allows exists as a room
        assert name <= {"*"} | {short_name(room) for room in rooms}, name
    graph = import_graph()
    homeless = [module for module in graph if module != PACKAGE and room_of(module, rooms) is None]
    assert not homeless, f"modules in no room of docs/architecture.md: {homeless}"
    broken = []
    for module, imported in graph.items():
        if module == PACKAGE:
            continue
        home = room_of(module, rooms)
        for other in imported:
            there = room_of(other, rooms) if other != PACKAGE else None
            if there in (None, home) or "*" in rooms[home]:
                continue
            if short_name(there) not in rooms[home]:
                broken.append(f"{module} imports {other} ({short_name(home)} may not import {short_name(there)})")
    assert not broken, broken


def test_no_method_name_outside_its_method():
    """What is LoRA's lives in the LoRA method: outside it, the package names LoRA only where it lists the methods.
    (The entry point's file name and litgpt's own module names are not structure.)"""
    allowed = {ROOT / PACKAGE / "methods" / "lora.py", ROOT / PACKAGE / "methods" / "__init__.py"}
    found = []
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        if path in allowed:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if re.search(r"lora", code, re.IGNORECASE) and not re.search(r"finetune_lora|LoRA\b", code):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not found, found
