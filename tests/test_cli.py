"""The one CLI runner (`llava_jax.cli`): user errors are one line and exit 2, anything else a traceback; every
command's `main` goes through it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from llava_jax import cli

PACKAGE = Path(__file__).resolve().parents[1] / "llava_jax"
# mains that are no command of their own: the bench dispatcher hands argv to two decorated mains; the absl
# mains (training, planner) exit through cli.fail from their flag parsers and handlers.
NOT_DECORATED = {"llava_jax/bench.py", "llava_jax/train/__main__.py", "llava_jax/train/plan.py"}


def test_user_error_is_one_line_and_exit_2(capsys):
    @cli.command(ValueError)
    def main(argv=None):
        raise ValueError(f"{argv}: bad\n  value")

    assert main("data.json") == 2
    assert capsys.readouterr().err == "error: data.json: bad value\n"


def test_usage_error_and_exits_mode(capsys):
    @cli.command(exits=True)
    def main(argv=None):
        raise cli.UsageError("--n must be >= 1")

    with pytest.raises(SystemExit, match="error: --n must be >= 1") as exit_info:
        main()
    assert exit_info.value.code == 2 and capsys.readouterr().err == "error: --n must be >= 1\n"


def test_other_errors_propagate_and_results_pass_through():
    @cli.command(OSError)
    def broken(argv=None):
        raise ZeroDivisionError("a bug")

    @cli.command()
    def fine(argv=None):
        return {"ok": 1} if argv else None

    with pytest.raises(ZeroDivisionError):
        broken()
    assert fine(["x"]) == {"ok": 1} and fine() == 0


def test_system_errors_name_the_file_without_errno():
    assert cli.describe(FileNotFoundError(2, "No such file or directory", "configs/nope.py")) == \
        "configs/nope.py: No such file or directory"
    nested = OSError("Failed loading config file\n  Attempted:\n    [Errno 2] No such file or directory: 'c.py'")
    assert cli.describe(nested) == "c.py: No such file or directory"
    assert cli.describe(KeyError("missing field 'text'")) == "missing field 'text'"


def test_every_main_goes_through_the_runner():
    undecorated = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE.parent))
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and node.name == "main" and rel not in NOT_DECORATED:
                names = [ast.unparse(d) for d in node.decorator_list]
                if not any(n.startswith("cli.command(") for n in names):
                    undecorated.append(rel)
    assert undecorated == []
    mains = [p for p in PACKAGE.rglob("*.py") if "\ndef main(" in p.read_text() or "\n@cli.command(" in p.read_text()]
    assert len(mains) >= 18
