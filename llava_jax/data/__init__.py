"""llava_jax."""
