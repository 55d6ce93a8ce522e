"""The size limits the architecture clean-up set (issue 11): a file in accel/ or benchmarks/ stays under 450
lines and a function under 80, Triton kernels excepted (a kernel reads best as one body)."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "accel").rglob("*.py"), *(ROOT / "benchmarks").rglob("*.py")])
MAX_FILE_LINES = 450
MAX_FUNCTION_LINES = 80


def _is_kernel(node: ast.FunctionDef) -> bool:
    """Decorated with triton.jit, bare or called."""
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if isinstance(target, ast.Attribute) and target.attr == "jit":
            return True
    return False


def test_sources_found():
    assert len(SOURCES) > 50


def test_no_file_over_the_line_limit():
    long = {str(p.relative_to(ROOT)): n for p in SOURCES if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES}
    assert not long, f"files over {MAX_FILE_LINES} lines (split them by responsibility): {long}"


def test_no_function_over_the_line_limit_except_kernels():
    long = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not _is_kernel(node):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps): {long}"
