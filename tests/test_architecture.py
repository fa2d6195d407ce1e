"""The layering rules of shared/design.md, checked on the source: each layer imports only the ones below it, no
import cycle among the modules of server/ and loom_kernels/, nothing there imports loadtests/, tests/ or tools/, and
no file there is over 400 lines, no function over 60."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"loom_kernels": 0, "server.logs": 0, "server.model": 1, "server.engine": 2, "server.tasks": 3, "server.api": 4,
          "server.cli": 5}


def modules() -> dict[str, Path]:
    found = {}
    for path in [*ROOT.glob("server/**/*.py"), *ROOT.glob("loom_kernels/**/*.py")]:
        if path.name.startswith("test_") or path.name == "conftest.py":
            continue
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        found[name] = path
    return found


def imported(path: Path) -> set[str]:
    """Every absolute import in the file, function-level ones included, with `from a import b` also as `a.b`."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return names


def layer(module: str) -> int:
    return next(rank for prefix, rank in sorted(LAYERS.items(), key=lambda kv: -len(kv[0]))
                if module == prefix or module.startswith(prefix + "."))


def test_layers_import_downward_only_and_never_the_harness():
    mods = modules()
    # the scan sees every layer's modules (a broken glob would make the checks below vacuous)
    assert {"loom_kernels.backend", "server.model.llama", "server.model.weights.quant", "server.engine.scheduler",
            "server.tasks.summarize", "server.api.app", "server.cli.serve"} <= set(mods)
    for name, path in mods.items():
        for dep in imported(path):
            assert dep.split(".")[0] not in ("loadtests", "tests", "tools"), f"{name} imports {dep}"
            if dep in mods:
                assert layer(dep) <= layer(name), f"{name} (layer {layer(name)}) imports {dep} (layer {layer(dep)})"


def test_no_import_cycles():
    mods = modules()
    graph = {name: {d for d in imported(path) if d in mods and d != name} for name, path in mods.items()}
    done: set[str] = set()

    def visit(node: str, trail: list[str]) -> None:
        if node in trail:
            raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(node):] + [node]))
        if node in done:
            return
        for dep in sorted(graph[node]):
            visit(dep, trail + [node])
        done.add(node)

    for name in sorted(graph):
        visit(name, [])


def test_files_stay_short():
    long = {str(p.relative_to(ROOT)): n for p in modules().values() if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_functions_stay_short():
    long = {}
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long[f"{name}.{node.name}"] = node.end_lineno - node.lineno + 1
    assert not long, long
