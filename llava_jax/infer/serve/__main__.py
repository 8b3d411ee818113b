"""`python -m llava_jax.infer.serve`: the server (see llava_jax.infer.serve.cli)."""

import sys

from llava_jax.infer.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
