"""The package layout is the architecture: layers import only those below them, with no cycles.

model -> train -> index -> pipeline -> service -> tools (docs/ARCHITECTURE.md), and the serving
layers (index, pipeline, service) never import train/: serving runs without the training code.
Every import counts, including ones deferred inside functions: a deferred import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ["model", "train", "index", "pipeline", "service", "tools"]
SERVING = ("model", "index", "pipeline", "service")
WEB = ("fastapi", "starlette", "uvicorn")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of every module `path` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    here = _module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return found


def _graph() -> dict[str, set[str]]:
    files = [p for layer in LAYERS for p in (ROOT / layer).rglob("*.py")]
    modules = {_module_name(p): p for p in files}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (iterative DFS with colours)."""
    colour = dict.fromkeys(graph, 0)  # 0 new, 1 on the stack, 2 done
    for start in graph:
        if colour[start]:
            continue
        stack: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        path = [start]
        colour[start] = 1
        while stack:
            node, todo = stack[-1]
            if not todo:
                colour[node] = 2
                stack.pop()
                path.pop()
                continue
            nxt = todo.pop()
            if colour[nxt] == 1:
                return [*path[path.index(nxt) :], nxt]
            if colour[nxt] == 0:
                colour[nxt] = 1
                path.append(nxt)
                stack.append((nxt, sorted(graph[nxt])))
    return None


def test_no_import_cycles() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycle_finder_finds_a_planted_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_layers_import_only_downwards() -> None:
    wrong = []
    for module, deps in _graph().items():
        rank = LAYERS.index(module.split(".")[0])
        for dep in deps:
            if LAYERS.index(dep.split(".")[0]) > rank:
                wrong.append(f"{module} imports {dep}")
    assert not wrong, "\n".join(sorted(wrong))


def test_serving_never_imports_the_training_package() -> None:
    wrong = [f"{m} imports {d}" for m, deps in _graph().items() if m.split(".")[0] in SERVING for d in deps if d.split(".")[0] == "train"]
    assert not wrong, "\n".join(sorted(wrong))


def test_routes_only_wire_they_never_reach_into_the_index_layer() -> None:
    """Routes talk to the serving state and service modules (e.g. service.catalog_io), not to index/."""
    wrong = [f"{m} imports {d}" for m, deps in _graph().items() if m.startswith("service.routes.") for d in deps if d.startswith("index")]
    assert not wrong, "\n".join(sorted(wrong))


def test_only_the_http_layer_and_tools_know_the_web_stack() -> None:
    wrong = []
    for layer in ("model", "index", "pipeline"):
        for path in (ROOT / layer).rglob("*.py"):
            web = sorted(m for m in _imports(path) if m.split(".")[0] in WEB)
            if web:
                wrong.append(f"{_module_name(path)}: {', '.join(web)}")
    assert not wrong, "\n".join(wrong)


def test_only_the_redis_store_talks_to_redis() -> None:
    users = {
        _module_name(p) for layer in LAYERS for p in (ROOT / layer).rglob("*.py") if any(m.split(".")[0] == "redis" for m in _imports(p))
    }
    # The Redis stores: the gallery's (index.redis_store) and the timeline jobs' (index.redis_jobs).
    assert all(u.startswith("index.redis_") for u in users), users


def test_the_image_serves_the_service_and_carries_the_cli() -> None:
    """The container serves `python -m service` (which imports no tools: the layer test above); the
    operator CLI rides along so `docker compose run --rm api-1 rice reindex ...` runs beside the replicas."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    for layer in ("model", "index", "pipeline", "service", "tools"):
        assert f"COPY {layer} ./{layer}" in dockerfile, layer
    assert not [line for line in dockerfile.splitlines() if line.startswith(("COPY", "ADD")) and "train" in line]  # no training code
    assert 'CMD ["python3", "-m", "service"]' in dockerfile
    assert (ROOT / "service" / "__main__.py").exists()


def test_decoders_do_not_load_torch() -> None:
    """Decode workers and the recording decoder are separate processes, one per core: torch would
    add hundreds of MB to each for nothing (they prepare uint8 frames; the engine normalises)."""
    import subprocess
    import sys

    code = (
        "import sys; import pipeline.decode, pipeline.decode_worker, pipeline.keyframes, pipeline.stream_decode; "
        "sys.exit(1 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
