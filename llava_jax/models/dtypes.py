"""The floating dtypes a model computes and stores its parameters in, by the names configs and command lines
use: the one table every `--dtype` flag, `model.dtype` config field and loader reads."""

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
