"""The package's shape: each layer imports only from the layers below it, and no modules import each other in a cycle.

Every ``import`` counts, at module level or inside a function: an import that is hidden in a function is still a
dependency. The layers are the folders of ``nsr_hf`` (README, "How the code is laid out").
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nsr_hf"

# lowest first; a module may import from its own layer (without a cycle) and from any layer before it
LAYERS = [
    ("base", ["nsr_hf.errors", "nsr_hf.run_folder", "nsr_hf.stage_clock", "nsr_hf.version", "nsr_hf.utils", "nsr_hf.shared_config",
              "nsr_hf.parsing", "nsr_hf.architectures", "nsr_hf.capture", "nsr_hf.models", "nsr_hf.metrics", "nsr_hf.methods",
              "nsr_hf.plotting", "nsr_hf.report_tokens"]),
    ("data", ["nsr_hf.data"]),
    ("scanner", ["nsr_hf.scanner"]),
    ("modeling", ["nsr_hf.modeling"]),
    ("training", ["nsr_hf.training"]),
    ("evaluation", ["nsr_hf.evaluation"]),
    ("analysis", ["nsr_hf.analysis"]),
    ("dashboard", ["nsr_hf.dashboard"]),
    ("pipeline", ["nsr_hf.pipeline", "nsr_hf.preflight", "nsr_hf.sweep", "nsr_hf.any_neuron", "nsr_hf.quickstart", "nsr_hf.capture_command",
                  "nsr_hf.cli", "nsr_hf.train"]),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return rank
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in tests/test_layers.py (and to the README's layout).")


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path) -> set[str]:
    """The nsr_hf modules ``path`` imports, wherever the import stands."""
    found = set()
    known = modules()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("nsr_hf"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nsr_hf") and node.level == 0:
            for a in node.names:  # `from nsr_hf.data import corpus` imports the module nsr_hf.data.corpus
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in known else node.module)
    return found


def test_every_module_belongs_to_a_layer():
    for name in modules():
        if name != "nsr_hf":
            layer_of(name)


def test_no_module_imports_from_a_layer_above_its_own():
    upward = []
    for name, path in modules().items():
        if name == "nsr_hf":  # the package root re-exports the public names (lazily)
            continue
        for target in imports_of(path):
            if target == "nsr_hf":
                pytest.fail(f"{name} imports the package root 'nsr_hf': import the module that defines the name instead.")
            if layer_of(target) > layer_of(name):
                upward.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} ({LAYERS[layer_of(target)][0]})")
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def test_no_import_cycle_between_modules():
    graph = {name: {t for t in imports_of(path) if t != name and t != "nsr_hf"} for name, path in modules().items() if name != "nsr_hf"}
    # a package's __init__ is where its modules are; importing it is importing them
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_layer_test_sees_an_upward_import(tmp_path):
    """The walk above is not vacuous: it finds imports inside functions."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from nsr_hf.pipeline import run_train\n")
    assert imports_of(source) == {"nsr_hf.pipeline"}
