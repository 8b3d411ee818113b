"""`python -m llava_jax.chat`: terminal chat with a LLaVA model (see llava_jax.infer.chat)."""

import sys

from llava_jax.infer.chat import main

if __name__ == "__main__":
    sys.exit(main())
