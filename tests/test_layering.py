"""The package's layers, read from its imports (function-local ones included) with `ast`.

docs/architecture.md draws the same picture: leaves -> data -> evaluation / config ->
methods -> distributed (Ray) -> pipeline / tasks -> run (the CLI). A module may import its
own layer or a lower one; the checks below are the rules a change must not break.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "dream_dist"

# Lowest first. A module's layer is the first prefix of its dotted name found here.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("leaves", ("errors", "seeding", "environment", "published", "viz", "formation", "kmeans",
                "models", "augment", "memory", "devices", "determinism", "hostsync")),
    ("data", ("data", "encoders", "artifact", "training")),
    ("evaluation", ("evaluation", "config")),
    ("methods", ("methods",)),
    ("distributed", ("distributed",)),
    ("pipeline", ("pipeline", "tasks", "sweep")),
    ("cli", ("run",)),
]


def module_name(path: Path, root: Path = PKG) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, name: str) -> set[str]:
    """Every module `path` imports, anywhere in it (module level or inside functions)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                if not is_pkg:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)  # `from pkg import module`
    return out


def graph(root: Path = PKG) -> dict[str, set[str]]:
    """{module: the package's modules it imports} for every module under `root`."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    g = {}
    for name, path in files.items():
        g[name] = {m for m in imports_of(path, name) if m in files and m != name}
    return g


def layer(name: str) -> int:
    short = name.split(".", 1)[1] if "." in name else ""
    for i, (_, prefixes) in enumerate(LAYERS):
        if any(short == p or short.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{name} is in no layer: add it to LAYERS and docs/architecture.md")


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


G = graph()
PACKAGES = {"dream_dist", "dream_dist.methods", "dream_dist.evaluation", "dream_dist.distributed",
            "dream_dist.data", "dream_dist.methods.dream"}


def test_the_graph_is_read():
    # Guards the checks below against passing on an empty or misread graph.
    assert "dream_dist.run" in G and "dream_dist.pipeline" in G
    assert "dream_dist.methods.dream.engine" in G["dream_dist.methods.dream.shard"] or \
        G["dream_dist.methods.dream.engine"], "imports were not resolved"


def test_no_import_cycles():
    assert cycles(G) == []


def test_nothing_imports_the_cli():
    users = sorted(m for m, deps in G.items() if "dream_dist.run" in deps)
    assert users == []


@pytest.mark.parametrize("name", sorted(set(G) - PACKAGES))
def test_imports_go_down_the_layers(name):
    up = sorted(d for d in G[name] if d not in PACKAGES and layer(d) > layer(name))
    assert up == [], f"{name} ({LAYERS[layer(name)][0]}) imports higher layers: {up}"


def test_ray_package_and_config_import_no_concrete_method():
    for name, deps in G.items():
        if name.startswith("dream_dist.distributed") or name == "dream_dist.config":
            concrete = sorted(d for d in deps if d.startswith("dream_dist.methods")
                              and d not in ("dream_dist.methods", "dream_dist.methods.base"))
            assert concrete == [], f"{name} imports concrete methods {concrete}"
            assert "dream_dist.methods" not in deps, f"{name} imports the method registry"


def test_methods_never_import_ray():
    for path in (PKG / "methods").rglob("*.py"):
        name = module_name(path)
        bad = sorted(m for m in imports_of(path, name)
                     if m == "ray" or m.startswith("ray.") or m.startswith("dream_dist.distributed"))
        assert bad == [], f"{name} imports {bad}"


def test_the_checks_catch_a_cycle_and_an_upward_import(tmp_path):
    # The same reader on a tiny package with a cycle and a method importing Ray.
    pkg = tmp_path / "dream_dist"
    (pkg / "methods").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "methods" / "__init__.py").write_text("")
    (pkg / "models.py").write_text("def f():\n    from dream_dist.methods import x\n")
    (pkg / "methods" / "x.py").write_text("import ray\nfrom dream_dist import models\n")
    g = graph(pkg)
    assert cycles(g) == [["dream_dist.methods.x", "dream_dist.models"]]
    assert layer("dream_dist.models") < layer("dream_dist.methods.x")
    assert "ray" in imports_of(pkg / "methods" / "x.py", "dream_dist.methods.x")


def test_only_the_ray_package_imports_ray():
    for path in PKG.rglob("*.py"):
        name = module_name(path)
        if name.startswith("dream_dist.distributed"):
            continue
        bad = sorted(m for m in imports_of(path, name) if m == "ray" or m.startswith("ray."))
        assert bad == [], f"{name} imports {bad}: Ray belongs in dream_dist.distributed"
