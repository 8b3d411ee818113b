"""`python -m llava_jax.serve`: OpenAI-compatible server and web chat (see llava_jax.infer.serve)."""

import sys

from llava_jax.infer.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
