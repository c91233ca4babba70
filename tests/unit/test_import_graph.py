"""Imports flow one way: no cycle among the modules of ``ipsecstack`` and ``backends``.

Every import statement counts, wherever it is: at the top, under ``if TYPE_CHECKING:``, or inside a
function (a function-local import hides a cycle, it does not remove it). ``from pkg import name`` is an
edge to ``pkg.name`` when that is a module (compiled ones are found by their ``.pyi`` stub), else to
``pkg``; a submodule's implicit import of its own parent package is not an edge.

The layers (``ipsecstack/agent/__init__.py``) are a contract too: the sans-IO core imports neither
the runtime nor a backend; the runtime imports no backend; a backend imports only the I/O protocols
(``ipsecstack.runtime.io``), the wire codecs, ``ipsecstack.errors`` and other backends; only the
composition root (``ipsecstack.agent``), the CLI and the demo name both.

There is no cycle (issue #11 took apart the last one, the IKE SA's class chain); keep it so. The task
modules under ``ipsecstack/ike/tasks`` see their IKE SA only through the ``Context`` protocol, and the
events are generic in the IKE SA's type, so nothing below ``ike/session.py`` imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("ipsecstack", "backends")


def _name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py*")):
            if path.suffix in (".py", ".pyi") and "__pycache__" not in path.parts:
                out.setdefault(_name(path), path)
    return out


def _targets(node: ast.AST, module: str, is_package: bool, known: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            base = module.split(".") if is_package else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            mod = ".".join(base + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
        names = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod for a in node.names]
    else:
        return []
    out = []
    for t in names:
        while t and t not in known:  # `import a.b.c` of a name inside a module: the module
            t = t.rpartition(".")[0]
        if t and t != module:
            out.append(t)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        if path.suffix != ".py":
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            graph[mod].update(_targets(node, mod, path.name == "__init__.py", mods))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, edges = work[-1]
            w = next(edges, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    x = stack.pop()
                    on_stack.discard(x)
                    comp.add(x)
                    if x == v:
                        break
                if len(comp) > 1:
                    found.append(frozenset(comp))
    return found


def test_the_checker_sees_every_kind_of_import() -> None:
    graph = import_graph()
    assert "ipsecstack.native._engine" in graph  # the compiled engine, by its stub
    assert "ipsecstack.native._engine" in graph["ipsecstack.native.engine"]
    assert "ipsecstack.config_values" in graph["ipsecstack.connections"]
    toy = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(toy) == [frozenset({"a", "b", "c"})]
    assert cycles({"a": {"b"}, "b": set()}) == []
    # imports inside functions and under TYPE_CHECKING count like the others
    tree = ast.parse("if TYPE_CHECKING:\n    from ipsecstack.ike import session\n"
                     "def f():\n    from ipsecstack.config import parse_ts\n")  # fmt: skip
    seen = [t for n in ast.walk(tree) for t in _targets(n, "ipsecstack.connections", False, _modules())]
    assert seen == ["ipsecstack.ike.session", "ipsecstack.config"]


def test_no_import_cycles() -> None:
    found = [sorted(c) for c in cycles(import_graph())]
    assert not found, f"import cycles: {found} (break them: move what both sides need into a module below both)"


TOP = ("ipsecstack.agent", "ipsecstack.cli", "ipsecstack.__main__", "ipsecstack.demo")
BACKEND_MAY_USE = ("ipsecstack.runtime.io", "ipsecstack.errors", "ipsecstack.wire", "backends")


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def layer(module: str) -> str:
    if _under(module, ("backends",)):
        return "backends"
    if _under(module, TOP):
        return "top"
    if _under(module, ("ipsecstack.runtime",)):
        return "runtime"
    return "core"


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for mod, targets in sorted(graph.items()):
        here = layer(mod)
        for t in sorted(targets):
            there = layer(t)
            if (
                (here == "core" and there != "core")
                or (here == "runtime" and there in ("backends", "top"))
                or (here == "backends" and not _under(t, BACKEND_MAY_USE))
            ):
                bad.append(f"{mod} ({here}) -> {t} ({there})")
    return bad


def test_the_layer_check_catches_each_kind_of_crossing() -> None:
    toy = {
        "ipsecstack.datapath": {"ipsecstack.runtime.node"},
        "ipsecstack.runtime.node": {"backends.tun", "ipsecstack.datapath"},
        "backends.tun": {"ipsecstack.runtime.io", "ipsecstack.wire.ip", "ipsecstack.config"},
        "ipsecstack.agent.build": {"backends.tun", "ipsecstack.runtime.node", "ipsecstack.datapath"},
    }
    assert layer_violations(toy) == [
        "backends.tun (backends) -> ipsecstack.config (core)",
        "ipsecstack.datapath (core) -> ipsecstack.runtime.node (runtime)",
        "ipsecstack.runtime.node (runtime) -> backends.tun (backends)",
    ]
    assert layer("ipsecstack.agent") == layer("ipsecstack.cli") == "top"


def test_imports_respect_the_layers() -> None:
    graph = import_graph()
    assert {"ipsecstack.agent.build", "ipsecstack.runtime.fastpath", "backends.nfqueue"} <= set(graph)
    bad = layer_violations(graph)
    assert not bad, "imports across the layers (ipsecstack/agent/__init__.py): " + "; ".join(bad)
