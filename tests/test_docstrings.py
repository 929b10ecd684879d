"""Every public class of the package shows how it is used: a docstring example, which pytest runs as a doctest."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[1] / "src" / "anomalib_vqflow"


def test_every_public_class_has_a_runnable_example() -> None:
    missing = [
        f"{path.relative_to(PACKAGE)}: {node.name}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for node in ast.parse(path.read_text()).body
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_")
        if ">>>" not in (ast.get_docstring(node) or "")
    ]
    assert not missing, f"public classes without an example: {missing}"
