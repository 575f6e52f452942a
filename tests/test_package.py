"""The package's shape: imports point one way (no two modules of llama/ import each other, even
lazily inside a function), so each module can be read, tested and replaced on its own."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llama"


def imports() -> dict[str, set[str]]:
    """Each module of llama/ and the modules of llama/ it imports anywhere in its source."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_no_module_imports_one_that_imports_it_back():
    graph = imports()
    assert {"llama.generation", "llama.loading", "llama.decoding", "llama.kernels"} <= graph.keys()

    def reachable(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for nxt in graph[todo.pop()] - seen:
                seen.add(nxt)
                todo.append(nxt)
        return seen

    cycles = sorted((a, b) for a in graph for b in graph[a] if a in reachable(b))
    assert cycles == []


def test_the_model_file_imports_nothing_of_the_project():
    """model.py is Meta's network alone: quantization, kernels and loading act on it from outside."""
    assert imports()["llama.model"] == set()


def test_importing_the_package_is_quiet_and_does_nothing(tmp_path):
    """No warning (torch warns without numpy, a runtime dependency) and no output, files or threads."""
    import subprocess
    import sys

    code = "import threading, llama, llama.loading, llama.convert.gguf; assert threading.active_count() == 1"
    r = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert r.returncode == 0 and r.stdout == r.stderr == "", r.stderr
    assert list(tmp_path.iterdir()) == []
