"""python -m llava_jax.train --config=configs/stage2.py[:variant] [--workdir=DIR] [--config.field=value ...]"""

import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file, e.g. configs/stage2.py:demo.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, logs, TensorBoard); local or a "
                               "bucket. A workdir with checkpoints resumes from the latest. Default: "
                               "workdirs/<config>_<variant>.")


def main(argv):
    del argv
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
    except ValueError as e:
        if str(e).startswith("config."):
            print(f"invalid config: {e}", file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main)
