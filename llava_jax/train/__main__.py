"""python -m llava_jax.train --config=configs/stage2.py[:variant] [--workdir=DIR] [--config.field=value ...]

Exit status: 0 done (or preempted after saving a checkpoint), 2 a user error, printed as one line (an invalid
flag, config field or value, missing weights/data, an unusable workdir or one another job holds, no intact
checkpoint, a bad sample in data.strict mode), 3 stopped after train.max_nonfinite non-finite steps in a row,
1 a checkpoint that could not be saved (one line: the step and the disk) or an unexpected error. Library INFO
logs (absl, Orbax) are off unless --verbosity=0 is given.
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from llava_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file, e.g. configs/stage2.py:demo.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, TensorBoard); local or a "
                               "bucket. A workdir with checkpoints resumes from the latest. Default: "
                               "workdirs/<config>_<variant>.")


def quiet_library_logs() -> None:
    """Only warnings from absl/Orbax/grain unless the user asked for a verbosity."""
    import logging

    from absl import logging as absl_logging

    if not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)
        for name in ("orbax", "grain", "jax._src.xla_bridge"):
            logging.getLogger(name).setLevel(logging.WARNING)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing whose user errors (unknown flag or config field, bad value, broken config file) are
    one line and exit 2."""
    try:
        remaining = flags.FLAGS(argv)
        _CONFIG.value.keys()  # a config file that cannot be loaded fails here, not later with a traceback
        return remaining
    except OSError as e:  # a missing config file: 'error: --config: FILE: No such file or directory'
        cli.fail(f"error: --config: {cli.describe(e)}")
    except flags.Error as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        cause = lines[-1] if len(lines) > 1 else ""
        cli.fail(f"error: {lines[0] if lines else e}{' ' + cause if cause else ''}")
    except (KeyError, AttributeError) as e:  # --config.<field> naming no field
        name = str(e.args[0] if e.args else e).split("\n")[0].strip("'\"")
        given = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.") and name in a.split("=")[0]]
        cli.fail(f"error: unknown config field {(given or [name])[0]} ({name!r} is not a field)")


def check_workdir(workdir: str) -> None:
    """A local workdir must be a folder, or creatable, and writable (nothing is created here)."""
    if "://" in workdir:
        return
    path = os.path.abspath(workdir)
    if os.path.exists(path) and not os.path.isdir(path):
        cli.fail(f"error: --workdir {workdir} is not a folder")
    parent = path
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        cli.fail(f"error: --workdir {workdir} cannot be created: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        cli.fail(f"error: --workdir {workdir} is not writable ({parent})")


def main(argv):
    del argv
    quiet_library_logs()
    from llava_jax.data.errors import BadSample, DataFileError
    from llava_jax.train import checkpoint, loop, model_init, workdir_lock

    config = _CONFIG.value
    config_name = flags.FLAGS["config"].config_filename if hasattr(flags.FLAGS["config"], "config_filename") \
        else sys.argv[0]
    workdir = _WORKDIR.value or f"workdirs/stage{config.stage}_{config.variant.replace(',', '_')}"
    check_workdir(workdir)
    try:
        loop.run(config, workdir, config_name=config_name)
    except model_init.MissingInputs as e:
        print(e, file=sys.stderr)
        sys.exit(cli.EXIT_BAD_INPUT)
    except checkpoint.NoIntactCheckpoint as e:
        cli.fail(f"cannot resume: {e}")
    except workdir_lock.WorkdirLocked as e:
        cli.fail(f"error: {e}")
    except checkpoint.SaveFailed as e:
        print(f"training stopped: {e}", file=sys.stderr)
        sys.exit(1)
    except BadSample as e:
        cli.fail(f"bad sample (data.strict is set): {e}")
    except DataFileError as e:
        cli.fail(f"error: {e}")
    except loop.NonFiniteError as e:
        print(f"training stopped: {e}", file=sys.stderr)
        sys.exit(3)
    except OSError as e:  # workdir, data or weight files the system refuses
        cli.fail(f"error: {e}")
    except ValueError as e:
        if str(e).startswith("config."):
            cli.fail(f"invalid config: {e}")
        raise


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=parse_flags)
