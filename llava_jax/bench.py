"""`python -m llava_jax.bench generate ...`: generation speed against transformers (see llava_jax.infer.bench)."""

import sys

from llava_jax.infer.bench import main

if __name__ == "__main__":
    sys.exit(main())
