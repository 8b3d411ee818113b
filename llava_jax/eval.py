"""`python -m llava_jax.eval`: answer a model_vqa question file (see llava_jax.infer.evaluate)."""

import sys

from llava_jax.infer.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
