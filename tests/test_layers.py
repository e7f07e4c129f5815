"""The architecture, checked: imports flow one way (cli → study → bench → report → runtime → model → policy → io →
base) and no module reaches into another module's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import dynres

ROOT = Path(dynres.__file__).parent
# rank of each layer: a module may import its own package and any package of a lower rank, nothing else
# ("api" is dynres/__init__.py: it re-exports from the layers and nothing imports it)
RANK = {"base": 0, "io": 1, "policy": 2, "model": 3, "runtime": 4, "report": 5, "bench": 6, "study": 7, "cli": 8,
        "api": 9}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer(module: str) -> str:
    parts = module.split(".")
    if parts == ["dynres"]:
        return "api"
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in RANK) else "base"


def dynres_imports(path: Path) -> list[tuple[str, list[str], int]]:
    """Every import of a dynres module in a file, lazy ones included: (module, names imported, line)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "dynres":
            found.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "dynres"]
    return found


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def test_every_module_belongs_to_a_known_layer():
    assert {layer(m) for m in modules()} <= set(RANK)


def layer_violations(name: str, path: Path) -> list[str]:
    """Imports in ``path`` (module ``name``) of a package of the same or a higher layer than its own."""
    wrong = []
    for target, names, line in dynres_imports(path):
        for full in [f"{target}.{n}" for n in names if f"{target}.{n}" in modules()] or [target]:
            src, dst = layer(name), layer(full)
            if src != dst and RANK[dst] >= RANK[src]:
                wrong.append(f"{path.name}:{line} {src} imports {full} ({dst})")
    return wrong


def test_imports_flow_down_the_layers():
    wrong = [v for name, path in modules().items() for v in layer_violations(name, path)]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles_between_modules():
    mods = modules()
    graph = {m: set() for m in mods}
    for name, path in mods.items():
        for target, names, _ in dynres_imports(path):
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in mods]
            graph[name] |= {t for t in subs or [target] if t in mods and t != name}
    for m in graph:  # a package's __init__ re-exporting its modules is not a cycle through them
        if mods[m].name == "__init__.py":
            graph[m] = {t for t in graph[m] if not t.startswith(m + ".")}
    state: dict[str, int] = {}

    def visit(m: str, trail: list[str]) -> None:
        state[m] = 1
        for t in graph[m]:
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(t):] + [m, t]))
            if t not in state:
                visit(t, trail + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_no_module_imports_another_modules_private_names():
    wrong = []
    for name, path in modules().items():
        for target, names, line in dynres_imports(path):
            private = [n for n in names if n.startswith("_") and f"{target}.{n}" not in modules() and n != "__version__"]
            if private and target != name:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {private} from {target}")
            if any(part.startswith("_") and part != "_ui" for part in target.split(".")[1:]) and layer(target) != layer(name):
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports private module {target}")
    assert not wrong, "\n".join(wrong)


def private_attributes(path: Path) -> list[str]:
    """``obj._name`` uses where ``obj`` is not ``self``/``cls``: reaching into another object's private state."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                found.append(f"{path.name}:{node.lineno} {ast.unparse(node)}")
    return found


def test_no_module_reaches_into_another_objects_private_attributes():
    found = [f for path in modules().values() for f in private_attributes(path)]
    assert not found, "\n".join(found)


def test_the_checks_catch_an_upward_import_and_a_private_reach_in(tmp_path):
    """The checkers themselves: an io module importing the runtime and poking an engine's private method."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f(engine):\n    from dynres.runtime.engine import Engine\n    return engine._read(1)\n")
    assert layer_violations("dynres.io.bad", bad) == ["bad.py:2 io imports dynres.runtime.engine (runtime)"]
    assert private_attributes(bad) == ["bad.py:3 engine._read"]
    assert layer_violations("dynres.study.bad", bad) == []  # the study layer may use the runtime


def test_files_and_functions_stay_small():
    """The house rule the redesign set: no module over 500 lines, no function over 80."""
    too_long = []
    for name, path in modules().items():
        text = path.read_text()
        if text.count("\n") > 500:
            too_long.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 80:
                too_long.append(f"{name}.{node.name}: {node.end_lineno - node.lineno + 1} lines")
    assert not too_long, "\n".join(too_long)
