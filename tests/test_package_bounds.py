"""The package stays readable: at most 4,000 lines, no class over 170 lines and no function body over 60."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "litgpt_skip2lora"


def test_the_package_keeps_its_bounds() -> None:
    sources = {path: path.read_text(encoding="utf-8") for path in sorted(PACKAGE.rglob("*.py"))}
    assert sum(len(source.splitlines()) for source in sources.values()) <= 4000
    for path, source in sources.items():
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef):  # with its docstrings
                assert node.end_lineno - node.lineno + 1 <= 170, (path.name, node.name)
            if isinstance(node, ast.FunctionDef):
                body = node.body[1:] if ast.get_docstring(node) and len(node.body) > 1 else node.body
                assert node.end_lineno - body[0].lineno + 1 <= 60, (path.name, node.name)
