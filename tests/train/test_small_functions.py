"""The trainer is made of small parts: no function in llava_jax/train is longer than 60 lines."""

import ast
from pathlib import Path

TRAIN = Path(__file__).resolve().parents[2] / "llava_jax" / "train"
LIMIT = 60


def long_functions(source: str, name: str, limit: int = LIMIT) -> list[str]:
    return [f"{name}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > limit]


def test_no_function_in_train_is_over_60_lines():
    files = sorted(TRAIN.glob("*.py"))
    assert len(files) > 5
    assert [f for path in files for f in long_functions(path.read_text(), path.name)] == []


def test_the_check_counts_nested_functions_and_methods():
    body = "\n".join(f"    x{i} = {i}" for i in range(LIMIT))
    source = f"class A:\n  def m(self):\n{body}\n\ndef outer():\n  def inner():\n{body}\n  return inner\n"
    assert sorted(f.split(" ")[1] for f in long_functions(source, "s.py")) == ["inner", "m", "outer"]
