"""Package layering, checked on the source: every import of every module, parsed with `ast`.

    runtime/      imports no torch, open_clip, partclipseg or export (a robot installs only
                  `partclipseg-deploy[runtime]`); the one exception is the lazy PyTorch
                  reference backend, runtime/backends/torch.py, which may import torch and
                  partclipseg (inside its constructor).
    partclipseg/  never imports export or benchmarks (for now except partclipseg/demo.py, the
                  end-to-end demo that chains training, export and the runtime).
    export/       never imports benchmarks.

Imports inside functions count as much as top-level ones, and relative imports are resolved to
absolute module names. A subprocess test checks the import-time side as well: `import runtime`
and its submodules load no torch, open_clip or partclipseg.

Two rules hold for every package (`PACKAGES`):
- no private name (`_x`) is imported from another module: what modules share is public;
- no import cycle between its modules (a submodule importing its own parent package, as a
  registry's modules do, is not an edge: the parent is initialized first).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from .support import assert_imports_none

ROOT = Path(__file__).resolve().parents[1]

# package -> (forbidden top-level packages, {module: top-level packages it may import anyway})
RULES: dict[str, tuple[frozenset[str], dict[str, frozenset[str]]]] = {
    "runtime": (frozenset({"torch", "open_clip", "partclipseg", "export"}),
                {"runtime.backends.torch": frozenset({"torch", "partclipseg"})}),
    # partclipseg.demo chains train -> export -> runtime, so it needs export; nothing else in
    # partclipseg may (drop this exception when the demo leaves the package).
    "partclipseg": (frozenset({"export", "benchmarks"}),
                    {"partclipseg.demo": frozenset({"export"})}),
    "export": (frozenset({"benchmarks"}), {}),
}


def module_name(path: Path, root: Path = ROOT) -> str:
    """runtime/backends/torch.py -> "runtime.backends.torch"; runtime/__init__.py -> "runtime"."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in `source`, at any depth (functions,
    classes, `if TYPE_CHECKING:` blocks). `from . import x` gives "pkg.x" (x may be a module),
    `from .a import b` gives "pkg.a" and "pkg.a.b"."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if node.level - 1 > len(package):
                    raise ValueError(f"{module}:{node.lineno}: relative import beyond the top "
                                     "package")
                base = package[:len(package) - (node.level - 1)]
                if node.module:
                    base = base + node.module.split(".")
                absolute = ".".join(base)
            else:
                absolute = node.module or ""
            if absolute:
                found.append((node.lineno, absolute))
            found += [(node.lineno, f"{absolute}.{alias.name}" if absolute else alias.name)
                      for alias in node.names if alias.name != "*"]
    return found


def violations(package: str, root: Path = ROOT) -> list[str]:
    """"file:line: imports X" for every import that breaks `package`'s rule."""
    forbidden, allowed = RULES[package]
    files = sorted((root / package).rglob("*.py"))
    assert files, f"no modules found under {root / package}"
    missing = set(allowed) - {module_name(path, root) for path in files}
    assert not missing, (f"RULES names exceptions that are no module of {package}/ (moved or "
                         f"deleted? drop them from RULES): {sorted(missing)}")
    bad: dict[tuple[str, int], str] = {}
    for path in files:
        module = module_name(path, root)
        may = allowed.get(module, frozenset())
        for line, name in imports(path.read_text(), module, path.name == "__init__.py"):
            top = name.split(".")[0]
            if top in forbidden and top not in may:
                where = (path.relative_to(root).as_posix(), line)
                if where not in bad or len(name) < len(bad[where]):
                    bad[where] = name  # `from a.b import c`: reported as a.b
    return [f"{file}:{line}: imports {name}" for (file, line), name in sorted(bad.items())]


PACKAGES = ("runtime", "export", "partclipseg", "benchmarks")


def _modules(package: str, root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}


def private_imports(package: str, root: Path = ROOT) -> list[str]:
    """"file:line: X._name" for every `from X import _name` of another module."""
    bad = []
    for module, path in _modules(package, root).items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        bad.append(f"{path.relative_to(root).as_posix()}:{node.lineno}: "
                                   f"{node.module or '.'}.{alias.name}")
    return bad


def import_cycles(package: str, root: Path = ROOT) -> list[list[str]]:
    """Cycles of the graph module -> the package's modules it imports (at any depth)."""
    mods = _modules(package, root)
    graph: dict[str, set[str]] = {}
    for module, path in mods.items():
        edges = set()
        for _, name in imports(path.read_text(), module, path.name == "__init__.py"):
            while name and name not in mods:  # "pkg.mod.symbol" -> "pkg.mod"
                name = name.rpartition(".")[0]
            if name and name != module and not module.startswith(name + "."):
                edges.add(name)
        graph[module] = edges
    cycles, state = [], {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = "open"
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack + [n])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return cycles


@pytest.mark.parametrize("package", PACKAGES)
def test_no_private_name_crosses_a_module(package):
    bad = private_imports(package)
    assert not bad, "private names imported from another module:\n" + "\n".join(bad)


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle(package):
    cycles = import_cycles(package)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_cycle_and_private_checks_catch_what_they_are_for(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("def f():\n    from . import leaf\n")
    (pkg / "sub" / "leaf.py").write_text("from . import f\n")  # child -> parent: no edge
    (pkg / "a.py").write_text("from .b import _helper\n")
    (pkg / "b.py").write_text("def g():\n    from .a import thing\n")
    assert import_cycles("pkg", tmp_path) == [["pkg.a", "pkg.b", "pkg.a"]]
    assert private_imports("pkg", tmp_path) == ["pkg/a.py:1: b._helper"]


@pytest.mark.parametrize("package", sorted(RULES))
def test_package_imports_respect_the_layering(package):
    bad = violations(package)
    forbidden = ", ".join(sorted(RULES[package][0]))
    assert not bad, f"{package}/ must not import {forbidden}:\n" + "\n".join(bad)


def test_the_check_catches_imports_in_functions_and_relative_imports(tmp_path):
    """Negative checks: the scan cannot pass by missing the imports it is meant to catch."""
    source = ("import numpy as np\n"
              "def lazy():\n"
              "    import torch.nn\n"
              "    from partclipseg.model import build_model\n"
              "class C:\n"
              "    def m(self):\n"
              "        from .. import export\n"
              "        from ..bundle import BundleError\n"
              "        from . import onnxruntime\n")
    got = imports(source, "runtime.backends.foo")
    assert (3, "torch.nn") in got
    assert (4, "partclipseg.model") in got and (4, "partclipseg.model.build_model") in got
    assert (7, "runtime.export") in got  # `from .. import export` inside runtime is runtime's
    assert (8, "runtime.bundle") in got and (8, "runtime.bundle.BundleError") in got
    assert (9, "runtime.backends.onnxruntime") in got
    assert imports("from . import x\n", "pkg", is_package=True) == [(1, "pkg"), (1, "pkg.x")]
    with pytest.raises(ValueError, match="beyond the top"):
        imports("from ... import x\n", "runtime.bundle")
    # ... and through `violations`, on a package tree: the exception module may import torch,
    # another module's import inside a function is reported as file:line.
    (tmp_path / "runtime" / "backends").mkdir(parents=True)
    (tmp_path / "runtime" / "__init__.py").write_text("")
    (tmp_path / "runtime" / "backends" / "__init__.py").write_text("")
    (tmp_path / "runtime" / "backends" / "torch.py").write_text("import torch\n")
    (tmp_path / "runtime" / "seg.py").write_text("import numpy\n\n"
                                                 "def f():\n    import torch.nn as nn\n")
    assert violations("runtime", tmp_path) == ["runtime/seg.py:4: imports torch.nn"]


def test_runtime_imports_no_torch():
    assert_imports_none("import runtime, runtime.postprocess, runtime.preprocess, "
                        "runtime.vocabulary, runtime.segmenter, runtime.bundle, runtime.overlay, "
                        "runtime.predict, runtime.serve, runtime.client, runtime.text, runtime.io, "
                        "runtime.stream, runtime.video, runtime.options, "
                        "runtime.errors, runtime.bag, runtime.viewer, "
                        "runtime.backends.onnxruntime, runtime.backends.tensorrt, "
                        "runtime.backends.torch", ("torch", "open_clip", "partclipseg"))


def test_runtime_imports_no_rosbags_or_rerun():
    """Bags and the viewer are optional extras ([ros], [viz]): importing the runtime, the stream,
    predict or the modules that use them loads neither until a bag or a viewer is opened."""
    assert_imports_none("import runtime, runtime.stream, runtime.predict, runtime.bag, "
                        "runtime.viewer", ("rosbags", "rerun", "rerun_bindings"))
