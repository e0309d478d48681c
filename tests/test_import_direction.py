"""Import directions, read from the source with ``ast`` (nothing is imported).

The layering (README, Layout): data flows one way, ``frontends -> graph -> passes -> runtime -> kernels``; a pass never
imports the runtime; a kernel never imports a pass; ``kernels/`` imports only torch and
triton; ``passes/`` never imports triton or the runtime. The rules as the code keeps them, per layer
(direct imports, including those inside functions):

* ``errors``: nothing from memfit. ``graph``: only ``errors`` (the IR every layer speaks). ``liveness``: only
  ``errors`` and ``graph`` (the one memory model, read by passes and runtime alike).
* ``kernels/``: torch, triton, the standard library and ``memfit.errors`` (the one error hierarchy).
* ``projection``: nothing from memfit (the low-rank math in plain torch, shared by ops, passes and runtime).
* ``weights``: ``errors`` and ``kernels`` (weight encodings and the recipes that make graph tensors from a model's
  weights; read by ops, passes and runtime).
* ``sparsity``: ``errors`` and ``weights`` (pruning masks, scores, schedules and one-shot pruning; read by ops and
  passes).
* ``ops``: ``errors``, ``kernels``, ``projection``, ``weights`` and ``sparsity`` (each op's CPU body is its kernel's
  reference).
* ``passes/``: ``errors``, ``graph``, ``liveness``, ``ops``, ``projection`` (shapes), ``weights``, ``sparsity`` and
  other passes;
  never the runtime, kernels, frontends, the API or triton. Passes insert memfit ops through ``torch.ops.memfit``,
  never a kernel.
* ``runtime/``: ``errors``, ``graph``, ``liveness``, ``ops``, ``kernels``, ``projection``, ``weights`` and
  ``passes.base`` (the planner reads each pass's ``memory_effect``, never a pass's internals); never frontends or
  the API.
* ``frontends/``: ``errors``, ``graph`` and other frontends; ``frontends/dynamo.py`` alone also imports
  ``passes.base`` and ``runtime`` (it is the torch.compile door: it runs the Pipeline on what it
  captures and lowers the result, as ``api`` does for ``optimize``). Never kernels.
* ``measure``, ``models``, ``data``: only ``errors`` (leaf utilities).
* ``__init__``, ``api``, ``cli``, ``integrations`` (the transformers.Trainer door), ``zoo`` (the test matrix,
  which drives both doors), ``search`` (the sparse-update scheme search) and ``checkpoint`` (a Trainer's state
  saved and loaded across ranks): free to import any layer. Nothing else imports them.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import memfit

ROOT = Path(memfit.__file__).resolve().parent
NOT_PACKAGE = {"tests", "bench", "examples", "build", "memfit.egg-info"}
STDLIB = set(sys.stdlib_module_names)

ANY = object()  # a door: may import anything
# layer -> the memfit modules (prefixes) it may import directly
ALLOWED: dict[str, object] = {
    "errors": set(),
    "graph": {"errors"},
    "liveness": {"errors", "graph"},
    "kernels": {"errors", "kernels"},
    "projection": set(),
    "weights": {"errors", "kernels"},
    "sparsity": {"errors", "weights"},
    "ops": {"errors", "kernels", "projection", "weights", "sparsity"},
    "passes": {"errors", "graph", "liveness", "ops", "passes", "projection", "weights", "sparsity"},
    "runtime": {"errors", "graph", "liveness", "ops", "kernels", "runtime", "passes.base", "projection", "weights"},
    "frontends": {"errors", "graph", "frontends"},
    "frontends.dynamo": {"errors", "graph", "frontends", "runtime", "passes.base"},
    "measure": {"errors"},
    "models": {"errors"},
    "data": {"errors"},
    "__init__": ANY,
    "api": ANY,
    "cli": ANY,
    "integrations": ANY,  # transformers.Trainer door
    "zoo": ANY,  # the architecture matrix: builds models and drives both doors
    "search": ANY,  # the sparse-update scheme search: fine-tunes and plans (a user-facing function)
    "checkpoint": ANY,  # save_checkpoint / load_checkpoint: a Trainer's state across ranks (user-facing)
}
# "" is the package itself (__init__.py)
DOORS = {"", "api", "cli", "integrations", "integrations.hf", "zoo", "search", "checkpoint"}


def _package_files() -> list[Path]:
    def inside(p: Path) -> bool:
        return not any(d in NOT_PACKAGE or d.startswith(".") for d in p.relative_to(ROOT).parts[:-1])

    return sorted(p for p in ROOT.rglob("*.py") if inside(p))


def _module_name(path: Path) -> str:
    """Dotted name inside memfit ("" for the package itself, "passes" for passes/__init__.py)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(module: str, path: Path) -> str:
    if module == "":
        return "__init__"
    if module == "frontends.dynamo":
        return module
    return module.split(".")[0]


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """(memfit modules imported, relative to the package; top-level names of everything else)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    internal, external = set(), set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "memfit" or alias.name.startswith("memfit."):
                    internal.add(alias.name.removeprefix("memfit").lstrip("."))
                else:
                    external.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                name = node.module or ""
                if name == "memfit" or name.startswith("memfit."):
                    base = name.removeprefix("memfit").lstrip(".")
                    internal.update(_join(base, a.name) if not base else base for a in node.names)
                else:
                    external.add(name.split(".")[0])
                continue
            parts = package.split(".") if package else []
            if node.level - 1 > len(parts):
                raise AssertionError(f"{path}: relative import beyond the package")
            base = ".".join(parts[: len(parts) - (node.level - 1)])
            if node.module:
                internal.add(_join(base, node.module))
            else:  # from . import a, b: each name is a submodule
                internal.update(_join(base, a.name) for a in node.names)
    return internal, external


def _join(base: str, name: str) -> str:
    return f"{base}.{name}" if base else name


def _allowed(target: str, allowed: set[str]) -> bool:
    return any(target == a or target.startswith(a + ".") for a in allowed)


FILES = _package_files()
IDS = [str(p.relative_to(ROOT)) for p in FILES]


def test_the_scan_sees_every_layer():
    layers = {_layer(_module_name(p), p) for p in FILES}
    assert {"errors", "graph", "kernels", "ops", "passes", "runtime", "frontends", "api"} <= layers
    assert len([p for p in FILES if p.parent.name == "passes"]) >= 3  # base, fused_update, freeze


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_every_module_belongs_to_a_layer_with_rules(path):
    layer = _layer(_module_name(path), path)
    assert layer in ALLOWED, (f"{path.relative_to(ROOT)}: layer {layer!r} has no import rule; add it to ALLOWED "
                              "in tests/test_import_direction.py (and to DESIGN.md's layout)")


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_memfit_imports_follow_the_layers(path):
    module = _module_name(path)
    allowed = ALLOWED.get(_layer(module, path))
    if allowed is ANY or allowed is None:
        return
    internal, _ = _imports(path)
    bad = sorted(t for t in internal if not _allowed(t, allowed))
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}; its layer may import only {sorted(allowed)}"


@pytest.mark.parametrize("path", FILES, ids=IDS)
def test_only_the_doors_import_the_api(path):
    module = _module_name(path)
    if module in DOORS:
        return
    internal, _ = _imports(path)
    assert not {t for t in internal if t in DOORS or _allowed(t, {"api", "cli"})}, (
        f"{path.relative_to(ROOT)} imports the API; lower layers must not depend on the doors")


@pytest.mark.parametrize("path", [p for p in FILES if p.parent.name == "kernels"],
                         ids=[i for i, p in zip(IDS, FILES, strict=True) if p.parent.name == "kernels"])
def test_kernels_import_only_torch_triton_and_the_standard_library(path):
    _, external = _imports(path)
    bad = sorted(external - STDLIB - {"torch", "triton"})
    assert not bad, f"kernels/{path.name} imports {bad}"


@pytest.mark.parametrize("path", [p for p in FILES if p.parent.name != "kernels"],
                         ids=[i for i, p in zip(IDS, FILES, strict=True) if p.parent.name != "kernels"])
def test_triton_is_imported_only_in_kernels(path):
    _, external = _imports(path)
    assert "triton" not in external, f"{path.relative_to(ROOT)} imports triton; only kernels/ may"


def test_passes_never_import_the_runtime_kernels_or_triton():
    for path in (ROOT / "passes").glob("*.py"):
        internal, external = _imports(path)
        assert not {t.split(".")[0] for t in internal} & {"runtime", "kernels", "frontends", "api"}, path.name
        assert "triton" not in external, path.name


def test_only_dynamo_frontend_imports_the_runtime():
    importers = sorted(p.name for p in (ROOT / "frontends").glob("*.py")
                       if any(t.split(".")[0] == "runtime" for t in _imports(p)[0]))
    assert importers == ["dynamo.py"]


def test_the_scanner_resolves_relative_imports():
    """The scanner itself: a rule checker that sees no imports would pass everything."""
    internal, external = _imports(ROOT / "runtime" / "lower.py")
    assert {"ops", "errors", "kernels.adamw", "kernels.sgd"} <= internal
    assert "torch" in external
    internal, _ = _imports(ROOT / "passes" / "__init__.py")
    assert {"passes.freeze", "passes.fused_update"} <= internal
    internal, external = _imports(ROOT / "kernels" / "adamw.py")
    assert internal == {"errors", "kernels._checks"} and {"torch", "triton"} <= external
