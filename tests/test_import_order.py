"""The floors import one way: models, data and sharding.py < convert < infer < train.

Every import of every module counts, those inside functions too (parsed with ast, nothing is imported).
`sharding.py`, `vision_layout.py`, `atomic_files.py` and `cli.py` stand on the ground floor with models and data.
The top-level shims (chat.py, eval.py, bench.py, serve.py, judge.py, plan.py) and the package `__init__.py`
stand above all floors.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "llava_jax"
FLOORS = {"models": 0, "data": 0, "sharding": 0, "vision_layout": 0, "atomic_files": 0, "cli": 0,
          "convert": 1, "infer": 2, "train": 3}
SHIMS = {"__init__.py", "chat.py", "eval.py", "bench.py", "serve.py", "judge.py", "plan.py"}


def floor_of(module: str) -> int | None:
    """Floor of a dotted module name inside llava_jax (None: outside the package or a shim)."""
    parts = module.split(".")
    if parts[0] != "llava_jax" or len(parts) < 2:
        return None
    return FLOORS.get(parts[1])


def imported_modules(tree: ast.AST, module: str) -> list[tuple[int, str]]:
    """(line, dotted name) of every import in `tree`, relative ones resolved against `module`, plus string
    constants passed to importlib.import_module."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(module.split(".")[:-node.level] + ([base] if base else []))
            found += [(node.lineno, f"{base}.{a.name}" if base == "llava_jax" else base) for a in node.names]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == \
                "import_module" and node.args and isinstance(node.args[0], ast.Constant):
            found.append((node.lineno, str(node.args[0].value)))
    return found


def violations(source: str, module: str) -> list[str]:
    own = floor_of(module)
    if own is None:
        return []
    tree = ast.parse(source)
    return [f"{module}:{line} imports {name} (floor {floor_of(name)} > {own})"
            for line, name in sorted(imported_modules(tree, module))
            if floor_of(name) is not None and floor_of(name) > own]


def package_modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent)
        if rel.parent == Path("llava_jax") and path.name in SHIMS:
            continue
        yield ".".join(rel.with_suffix("").parts), path


def test_no_floor_imports_a_higher_floor():
    modules = list(package_modules())
    assert len(modules) > 30
    found = [v for module, path in modules for v in violations(path.read_text(), module)]
    assert found == []


def test_every_module_stands_on_a_floor():
    unplaced = [m for m, _ in package_modules() if floor_of(m) is None]
    assert unplaced == []


def test_the_check_sees_function_level_relative_and_string_imports():
    source = ("import llava_jax.train.loop\n"
              "def f():\n    from llava_jax.infer import generate\n"
              "def g():\n    from ..convert import io\n"
              "def h():\n    import importlib; importlib.import_module('llava_jax.train.demo')\n"
              "from llava_jax import train\n"
              "from llava_jax.models import llama\n")
    found = violations(source, "llava_jax.data.pipeline")
    assert [v.split(" imports ")[1].split(" ")[0] for v in found] == \
        ["llava_jax.train.loop", "llava_jax.infer", "llava_jax.convert", "llava_jax.train.demo", "llava_jax.train"]
    assert violations(source, "llava_jax.train.loop") == []
