"""The package's layering, read from the source with `ast` (nothing is imported).

The engine is a leaf of the serving stack: a second engine implementation (vLLM) sits
behind the worker's engine seam, and the engine must be usable without a router, a
worker, a frontend or discovery. Block hashes and KV event types, which all of them
share, live in splitserve.kvtypes, which imports nothing from splitserve at all.
Imports inside functions count too: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import splitserve

ROOT = Path(splitserve.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The splitserve modules a file imports (absolute names; relative ones resolved)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return {name for name in found if name == "splitserve" or name.startswith("splitserve.")}


GRAPH = {_module_name(p): _imports(p) for p in ROOT.rglob("*.py")}


def _reachable(start: str) -> set[str]:
    """Every splitserve module that importing `start` can import, directly or not."""
    seen, todo = set(), [m for m in GRAPH if m == start or m.startswith(start + ".")]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        for dep in GRAPH.get(m, ()):
            # `from pkg import name` names a module or an attribute: follow it when a
            # module, else the package it came from; a package also runs its __init__.
            target = dep if dep in GRAPH else dep.rpartition(".")[0]
            todo.extend(p for p in _parents(target) if p in GRAPH)
    return seen


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _within(modules: set[str], packages: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in packages))


def test_the_engine_reaches_no_router_worker_frontend_or_discovery_module():
    layers_above = tuple(f"splitserve.{p}" for p in ("router", "worker", "frontend", "discovery",
                                                    "cli", "deploy", "doctor"))
    assert _within(_reachable("splitserve.engine"), layers_above) == []


def test_kvtypes_is_a_leaf():
    direct = set().union(*(deps for m, deps in GRAPH.items() if m.startswith("splitserve.kvtypes")))
    assert sorted(d for d in direct if not d.startswith("splitserve.kvtypes")) == []


def test_engine_router_and_worker_share_kvtypes_and_the_graph_is_read():
    # Guards the test itself: were the parsing wrong, the checks above would pass vacuously.
    for user in ("splitserve.engine.block_pool", "splitserve.router.index",
                 "splitserve.worker.kv_events"):
        assert any(d.startswith("splitserve.kvtypes") for d in GRAPH[user]), user
    assert "splitserve.engine.llm_engine" in _reachable("splitserve.engine")


# splitserve's engine behind the worker's engine seam (worker/engine_api.py): the only
# worker module that may know the engine's code.
LOCAL_ENGINE = "splitserve.worker.async_engine"
VALUE_MODULES = ("splitserve.engine.types", "splitserve.engine.errors")
ENGINE_INTERNALS = {"runner", "kv_manager", "scheduler", "kv_cache_snapshot", "drain_kv_events",
                    "commit_reserved", "add_request", "abort_request"}
VLLM_ADAPTERS = "splitserve.worker.vllm_"


def test_the_worker_reaches_its_engine_only_through_the_seam():
    # A second engine (vLLM) must be able to serve the same worker: the seam and every
    # worker module but splitserve's engine's adapter use the engine's value types only
    # and errors (VALUE_MODULES), and touch no engine internals.
    leaks = {}
    for path in (ROOT / "worker").glob("*.py"):
        module = _module_name(path)
        if module == LOCAL_ENGINE:
            continue
        engine_modules = {d for d in GRAPH[module] if d.startswith("splitserve.engine.")
                          and not d.startswith(VALUE_MODULES)}
        # vLLM's adapters call vLLM's own API, whose names overlap ours (add_request).
        internals = set() if module.startswith(VLLM_ADAPTERS) else {
            n.attr for n in ast.walk(ast.parse(path.read_text()))
            if isinstance(n, ast.Attribute) and n.attr in ENGINE_INTERNALS}
        if engine_modules or internals:
            leaks[module] = sorted(engine_modules | internals)
    assert leaks == {}
