"""The layers a newcomer sees in the tree hold in the code: who may import whom."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "stapinit"

# Each package and the stapinit packages/modules it may import. The core is the
# ground floor; the four programs stand beside each other on it and on the shared
# wire format (protocol) and trust code, never on each other.
ALLOWED = {
    "core": {"core"},
    # The pinned TLS connection (trust.connection) speaks the wire format.
    "trust": {"core", "trust", "protocol"},
    "protocol": {"core"},
    # The local wire format between stap-client and stap-loader.
    "loader_wire": {"core", "protocol"},
    # COMPILE_SERVER and REQUIRE_SIGNED (initscript.remote, .verify) load the wire
    # format and the trust code, only when set: the boot path imports neither otherwise.
    "initscript": {"core", "initscript", "trust", "protocol"},
    "server": {"core", "trust", "protocol", "server"},
    "loader": {"core", "trust", "protocol", "loader_wire", "loader"},
    "client": {"core", "trust", "protocol", "loader_wire", "client"},
}


def imported_packages(path: Path) -> set[str]:
    """The ``stapinit.X`` (X a package or top-level module) that ``path`` imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "stapinit" and len(parts) > 1 and parts[1] != "__version__":
                found.add(parts[1])
    return found


def layer_of(path: Path) -> str:
    relative = path.relative_to(SRC)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def test_every_package_imports_only_the_layers_below_it() -> None:
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        layer = layer_of(path)
        if layer == "__init__":
            continue
        assert layer in ALLOWED, f"{path}: a package the layer table does not know"
        for imported in imported_packages(path) - ALLOWED[layer]:
            wrong.append(f"{path.relative_to(SRC)} imports stapinit.{imported}")
    assert wrong == []
