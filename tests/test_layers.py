"""The package's layers, from every module's import statements (read with ast, so imports inside functions count
too). Lower layers never import higher ones:

    batching  <  config, records, models, data  <  engine, simulation  <  study  <  integrations  <  cli, __main__,
    __init__

batching/ is pure decisions: the standard library, numpy and batching/ itself, nothing else (no torch). simulation/
runs without torch: of engine/ it reads emulation.py only (the slowdown plans), and it never imports torch. A new
subpackage must be given its place here, or this test fails."""
import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "dynbatch_core"
LAYERS = {"batching": 0, "config": 1, "records": 1, "models": 1, "data": 1, "engine": 2, "simulation": 2, "study": 3,
          "integrations": 4, "cli": 5, "__main__": 5, "__init__": 5}
BATCHING_MAY_IMPORT = {"numpy"}


def modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def layer_of(module: str) -> tuple[str, int]:
    """(the room, its layer) of a dotted module name inside the package."""
    parts = module.split(".")[1:]
    room = parts[0] if parts else "__init__"
    if room not in LAYERS:
        raise AssertionError(f"{module}: {room!r} has no place in tests/test_layers.py's LAYERS; give it one")
    return room, LAYERS[room]


def imports(module: str, path: Path) -> list[tuple[str, int]]:
    """(imported dotted name, line) for every import in the file, function-level ones included; relative imports
    resolved against the module's package. `from X import name` yields X.name when that is a module of ours."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    ours, found = modules(), []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            names = [f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in ours]
            found += [(name, node.lineno) for name in names] or [(source, node.lineno)]
    return found


def test_every_module_has_a_layer():
    for module in modules():
        layer_of(module)


@pytest.mark.parametrize("module", [name for name in modules() if name.startswith("dynbatch_core.batching")])
def test_batching_imports_only_the_standard_library_numpy_and_itself(module):
    for imported, line in imports(module, modules()[module]):
        top = imported.split(".")[0]
        if top == "dynbatch_core":
            assert imported.startswith("dynbatch_core.batching"), f"{module}:{line} imports {imported}"
        else:
            assert top in sys.stdlib_module_names or top in BATCHING_MAY_IMPORT, f"{module}:{line} imports {imported}"


@pytest.mark.parametrize("module", list(modules()))
def test_no_module_imports_a_higher_layer(module):
    room, layer = layer_of(module)
    for imported, line in imports(module, modules()[module]):
        if imported.split(".")[0] != "dynbatch_core":
            continue
        their_room, their_layer = layer_of(imported)
        assert their_layer <= layer, f"{module}:{line} ({room}, layer {layer}) imports {imported} ({their_room}, " \
                                     f"layer {their_layer})"


@pytest.mark.parametrize("module", [name for name in modules() if name.startswith("dynbatch_core.simulation")])
def test_simulation_imports_no_torch_and_of_the_engine_only_its_emulation(module):
    for imported, line in imports(module, modules()[module]):
        assert imported.split(".")[0] != "torch", f"{module}:{line} imports {imported}"
        if imported.startswith("dynbatch_core.engine"):
            assert imported == "dynbatch_core.engine.emulation", f"{module}:{line} imports {imported}"


def test_the_layers_hold_rooms_for_what_comes_next_and_the_check_sees_relative_and_lazy_imports(tmp_path):
    """The resolution itself: `from ..study import plots` inside a function of engine/ is study.plots."""
    source = tmp_path / "train.py"
    source.write_text("def f():\n    from ..study import plots\n    from .step import train_step\n")
    found = [name for name, _ in imports("dynbatch_core.engine.train", source)]
    assert found == ["dynbatch_core.study.plots", "dynbatch_core.engine.step"]
    assert layer_of("dynbatch_core.study.plots")[1] > layer_of("dynbatch_core.engine.train")[1]
