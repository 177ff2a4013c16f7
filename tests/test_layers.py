"""The floors of the code (README, "How the code is laid out"), checked from the import graph of every module,
including imports inside functions: imports only go down, and the ground floor stays light."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("core", "client", "serving", "export", "training", "bench")
# which of our packages each package may import (besides itself)
ALLOWED = {
    "core": set(),
    "client": {"core"},
    "serving": {"core"},
    "export": {"core", "serving"},
    # the demo drives generation through the client's Python API and its local-server launcher
    "training": {"core", "serving", "export", "client"},
    "bench": {"core", "client", "serving", "export", "training"},
}
# third-party libraries the ground floor may use: numpy and Pillow; typer for the shared CLI conventions
CORE_THIRD_PARTY = {"numpy", "PIL"}
CORE_CLI_THIRD_PARTY = {"typer"}
MODEL_LIBRARIES = {"torch", "torchvision", "diffusers", "transformers", "onnx", "onnxruntime", "openvino", "nncf"}


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in a file, at any depth."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            if node.module == "realfake":  # `from realfake import core`
                found += [(node.lineno, f"realfake.{alias.name}") for alias in node.names]
    return found


def _package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "realfake" and len(parts) > 1 else None


def _modules(package: str):
    yield from sorted((ROOT / package).rglob("*.py"))


def test_imports_only_go_down():
    wrong = []
    for package in PACKAGES:
        for path in _modules(package):
            for line, module in _imports(path):
                target = _package_of(module)
                if target and target != package and target not in ALLOWED[package]:
                    wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module} ({package} -> {target})")
    assert not wrong, "imports that climb a floor:\n" + "\n".join(wrong)


def test_no_circles_between_modules():
    """No two of our modules import each other, directly or through others (lazy imports count too)."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES[:-1]:
        for path in _modules(package):
            rel = path.relative_to(ROOT).with_suffix("")
            name = "realfake." + ".".join(rel.parts)
            graph[name.removesuffix(".__init__")] = {m for _, m in _imports(path) if m.startswith("realfake.")}
    for name, deps in graph.items():
        graph[name] = {d for d in deps if d in graph and d != name}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(
                    " -> ".join(stack[stack.index(dep) :] + [node, dep]) if dep in stack else f"{node}->{dep}"
                )
            elif dep not in state:
                visit(dep, stack + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_core_is_light():
    stdlib = set(sys.stdlib_module_names) | {"__future__"}
    wrong = []
    for path in _modules("core"):
        allowed = CORE_THIRD_PARTY | (CORE_CLI_THIRD_PARTY if path.name == "cli.py" else set())
        for line, module in _imports(path):
            top = module.split(".")[0]
            if top not in stdlib and top != "realfake" and top not in allowed:
                wrong.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    assert not wrong, "core/ uses numpy and Pillow only:\n" + "\n".join(wrong)


def test_client_never_names_a_model_library():
    """Beside the runtime probe in test_client_light: not even a lazy import of torch & co. in client/."""
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {module}"
        for path in _modules("client")
        for line, module in _imports(path)
        if module.split(".")[0] in MODEL_LIBRARIES
    ]
    assert not wrong, "\n".join(wrong)


def test_the_rules_can_fail(tmp_path):
    """The checker sees a climbing import inside a function (guards the tests above against passing vacuously)."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from realfake.export.triton_repo import write_repository\n")
    assert (2, "realfake.export.triton_repo") in _imports(probe)
    assert _package_of("realfake.export.triton_repo") not in ALLOWED["serving"]
