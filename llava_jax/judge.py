"""`python -m llava_jax.judge`: GPT-judged benchmarks, LLaVA-Bench and MM-Vet (see llava_jax.infer.judge)."""

import sys

from llava_jax.infer.judge import main

if __name__ == "__main__":
    sys.exit(main())
