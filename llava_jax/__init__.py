"""llava_jax: LLaVA and LLaVA-1.5 in JAX / Flax NNX."""
