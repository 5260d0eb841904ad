"""One-way imports: every module under src/tulle imports only from its own layer and the ones before it.

    cni < model < kernelstate < datastore < {ipam, routing, policy, guard} < dataplane < agent < connectivity
    < lab < cli

The compilers (ipam, routing, policy, guard) are one layer and may use each other. On top of the order:
- cni is the plugin binary's: the standard library only;
- kernelstate is plain data: the standard library and model only;
- dataplane, the only code that writes the kernel, takes its input as kernelstate data and from
  model only the protocol table (`tulle.model.protocols`, which every layer may use).
Every import counts: at module level, inside functions, and under `if TYPE_CHECKING:`.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "tulle"

LAYERS: tuple[frozenset[str], ...] = (
    frozenset({"cni"}),
    frozenset({"model"}),
    frozenset({"kernelstate"}),
    frozenset({"datastore"}),
    frozenset({"ipam", "routing", "policy", "guard"}),
    frozenset({"dataplane"}),
    frozenset({"agent"}),
    frozenset({"connectivity"}),  # before lab: the checks cannot reach into how a lab makes its pods
    frozenset({"lab"}),
    frozenset({"cli"}),
)
RANK = {package: rank for rank, layer in enumerate(LAYERS) for package in layer}
SHARED = frozenset({"tulle", "tulle.model.protocols"})  # the package root (import-free) and the protocol table
STDLIB_ONLY = frozenset({"cni", "kernelstate"})
ONLY_FROM: dict[str, frozenset[str]] = {
    "kernelstate": frozenset({"model"}),
    "dataplane": frozenset({"kernelstate"}),
}


@dataclass(frozen=True)
class Import:
    path: Path
    line: int
    module: str  # absolute dotted name

    def where(self) -> str:
        return f"{self.path.relative_to(SRC.parent)}:{self.line}: import {self.module}"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, source: str | None = None) -> list[Import]:
    """Every import in the file (or in source, as if it stood at path), wherever it stands, with
    relative ones made absolute."""
    tree = ast.parse(path.read_text() if source is None else source, str(path))
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.extend(Import(path, node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            if base == "tulle":  # `from tulle import policy` names a subpackage
                out.extend(Import(path, node.lineno, f"tulle.{alias.name}") for alias in node.names)
            else:
                out.append(Import(path, node.lineno, base))
    return out


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "tulle" else None


def violation(imp: Import) -> str | None:
    """Why the import breaks the layering, or None if it does not."""
    here = layer_of(module_name(imp.path))
    if here is None:
        return None
    top = imp.module.split(".")[0]
    if top != "tulle":
        if here in STDLIB_ONLY and top not in sys.stdlib_module_names and top != "__future__":
            return f"{here} may import only the standard library"
        return None
    there = layer_of(imp.module)
    if there is None or there == here or (imp.module in SHARED and here != "cni"):
        return None
    if there not in RANK:
        return f"{there} is in no layer: add it to LAYERS in {Path(__file__).name}"
    if here not in RANK:
        return f"{here} is in no layer: add it to LAYERS in {Path(__file__).name}"
    if RANK[there] > RANK[here]:
        return f"{here} may not import {there}, a later layer"
    if here in ONLY_FROM and there not in ONLY_FROM[here]:
        allowed = " and ".join(sorted(ONLY_FROM[here]))
        return f"{here} may import only {allowed} (and {', '.join(sorted(SHARED - {'tulle'}))})"
    if here == "cni":
        return "cni may import only the standard library"
    return None


def all_violations() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for imp in imports(path):
            why = violation(imp)
            if why is not None:
                out.append(f"{imp.where()}  ({why})")
    return out


def test_every_import_follows_the_layers() -> None:
    found = all_violations()
    assert not found, "imports against the layer order:\n" + "\n".join(found)


def test_the_checker_sees_every_kind_of_import() -> None:
    """The test itself: relative, function-level and TYPE_CHECKING imports are all read."""
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import nft\n"
        "from ..agent import daemon\n"
        "if TYPE_CHECKING:\n"
        "    from tulle.policy.compiler import PolicyModel\n"
        "def f():\n"
        "    import tulle.lab.cluster\n"
        "    from tulle import cli\n"
        "    import pyroute2\n"
    )
    path = PACKAGE / "dataplane" / "probe.py"  # never written: the source is read as if it stood there
    got = [(i.line, i.module) for i in imports(path, source) if violation(i) is not None]
    assert got == [(3, "tulle.agent"), (5, "tulle.policy.compiler"), (7, "tulle.lab.cluster"), (8, "tulle.cli")]
    kernelstate = PACKAGE / "kernelstate" / "_layers_probe.py"
    assert violation(Import(kernelstate, 1, "pyroute2")) == "kernelstate may import only the standard library"
    assert violation(Import(kernelstate, 1, "tulle.model.protocols")) is None
    assert violation(Import(PACKAGE / "cni" / "x.py", 1, "tulle.model.protocols")) is not None
    assert violation(Import(PACKAGE / "policy" / "x.py", 1, "tulle.routing.compile")) is None
    assert violation(Import(PACKAGE / "policy" / "x.py", 1, "tulle.dataplane.nft")) is not None


# The datastore's backends: made only by its factory, so only datastore/ knows they exist.
BACKENDS = frozenset({"tulle.datastore.etcd", "tulle.datastore.etcd_client", "tulle.datastore.memory"})


def backend_imports() -> list[str]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if module_name(path).startswith("tulle.datastore"):
            continue
        for imp in imports(path):
            if any(imp.module == b or imp.module.startswith(b + ".") for b in BACKENDS):
                out.append(imp.where())
    return out


def test_nothing_outside_the_datastore_imports_a_backend() -> None:
    found = backend_imports()
    assert not found, "backends are made by tulle.datastore.factory only:\n" + "\n".join(found)
