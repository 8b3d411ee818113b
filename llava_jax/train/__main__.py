"""python -m llava_jax.train --config=configs/stage2.py[:variant] [--workdir=DIR] [--config.field=value ...]

Exit status: 0 done (or preempted after saving a checkpoint), 2 invalid config or missing weights/data,
3 stopped after train.max_nonfinite non-finite steps in a row. Library INFO logs (absl, Orbax) are off unless
--verbosity=0 is given.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

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


def main(argv):
    del argv
    quiet_library_logs()
    from llava_jax.train import loop, model_init

    config = _CONFIG.value
    config_name = flags.FLAGS["config"].config_filename if hasattr(flags.FLAGS["config"], "config_filename") \
        else sys.argv[0]
    workdir = _WORKDIR.value or f"workdirs/stage{config.stage}_{config.variant.replace(',', '_')}"
    try:
        loop.run(config, workdir, config_name=config_name)
    except model_init.MissingInputs as e:
        print(e, file=sys.stderr)
        sys.exit(2)
    except loop.NonFiniteError as e:
        print(f"training stopped: {e}", file=sys.stderr)
        sys.exit(3)
    except ValueError as e:
        if str(e).startswith("config."):
            print(f"invalid config: {e}", file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
