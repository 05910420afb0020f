"""One room per job, in numbers: no module of esmdist/ over 500 lines, no function over 80.
(Imports flowing down the layers is import-linter's contract in pyproject.toml.)"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def main() -> int:
    problems = []
    for path in sorted(Path(__file__).resolve().parents[1].glob("esmdist/**/*.py")):
        text = path.read_text()
        if (lines := len(text.splitlines())) > MAX_MODULE_LINES:
            problems.append(f"{path}: {lines} lines (at most {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    problems.append(f"{path}:{node.lineno} {node.name}: {length} lines "
                                    f"(at most {MAX_FUNCTION_LINES})")  # fmt: skip
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
