"""A small stand-in language model with the LLaVA call signature, for optimizer and step tests."""

import jax.numpy as jnp
from flax import nnx

from llava_jax.models import layers


class ToyLM(nnx.Module):
    """ids [B, T] -> logits [B, T, V] through an embedding, a stack of linears and a norm."""

    def __init__(self, vocab: int = 17, dim: int = 8, num_layers: int = 2, *, rngs: nnx.Rngs):
        self.embed = layers.Embedding(vocab, dim, rngs=rngs)
        self.proj = layers.Linear(dim, dim, axes=("mlp", "embed"), use_bias=True, rngs=rngs)
        self.layers = layers.make_stack(
            lambda r: layers.Linear(dim, dim, axes=("mlp", "embed"), use_bias=True, rngs=r), num_layers, rngs)
        self.norm = layers.RMSNorm(dim, eps=1e-5, rngs=rngs)

    def __call__(self, ids, attention_mask=None):
        return self.logits(self.hidden_states(ids))

    def hidden_states(self, ids):
        x = self.proj(self.embed(ids))
        x, _ = layers.run_stack(self.layers, lambda layer, h, _: (h + jnp.tanh(layer(h)), None), x)
        return self.norm(x)

    def logits(self, hidden):
        return self.embed.attend(hidden)
