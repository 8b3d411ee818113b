"""LLaMA-family decoder against transformers (PyTorch, CPU, float32) on tiny random models."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from llava_jax.convert.hf_llama import llama_config_from_hf, llama_config_to_hf
from llava_jax.convert.params import load_state_dict
from llava_jax.models.llama import PRESETS, LlamaConfig, LlamaForCausalLM, count_params

VOCAB = 211
TINY = dict(vocab_size=VOCAB, hidden_size=60, intermediate_size=97, num_hidden_layers=3, num_attention_heads=6,
            num_key_value_heads=6, max_position_embeddings=256, rms_norm_eps=1e-5)
# Hugging Face configs of each variant (head_dim 10 unless set; 15 is impossible: rotary needs it even).
VARIANTS = {
    "mha": ("llama", {}),
    "gqa": ("llama", dict(num_key_value_heads=2, head_dim=14)),
    # Wavelengths 6.3, 23.6, 88, ... against 64/4 and 64/1: high, medium and low frequency bands all occur.
    "llama3": ("llama", dict(num_key_value_heads=3, head_dim=14, rope_parameters=dict(
        rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64))),
    "linear": ("llama", dict(rope_parameters=dict(rope_type="linear", rope_theta=1000.0, factor=2.5))),
    "tied": ("llama", dict(tie_word_embeddings=True)),
    "bias": ("llama", dict(num_key_value_heads=3, attention_bias=True, mlp_bias=True)),
    "mistral": ("mistral", dict(num_key_value_heads=2, sliding_window=7)),
    "qwen2": ("qwen2", dict(num_key_value_heads=3, tie_word_embeddings=True)),
}


def randomize_(module: torch.nn.Module, seed: int) -> None:
    """Random values in every tensor, biases and norm weights included (their init is 0 / 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.3 * noise if "norm" in name else 0.1 * noise)


@functools.lru_cache(maxsize=None)
def hf_model(variant: str) -> torch.nn.Module:
    model_type, extra = VARIANTS[variant]
    config = transformers.AutoConfig.for_model(model_type, **{**TINY, **extra})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    randomize_(model, seed=len(variant))
    return model


def ours(variant: str, **runtime) -> LlamaForCausalLM:
    hf = hf_model(variant)
    config = llama_config_from_hf(hf.config, **runtime)
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(1))
    tensors = {k: v.numpy() for k, v in hf.state_dict().items()}
    if config.tie_word_embeddings:  # transformers 5 lists the tied head in state_dict(); we have none
        np.testing.assert_array_equal(tensors.pop("lm_head.weight"), tensors["model.embed_tokens.weight"])
    load_state_dict(model, tensors, source=variant)
    return model


@functools.lru_cache(maxsize=None)
def jitted(variant: str, **runtime):
    """(forward(ids, mask) -> logits, decode(cache, ids, mask) -> (logits, cache), model) as jitted pure
    functions of the nnx.split state."""
    model = ours(variant, **runtime)
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, ids, mask):
        return nnx.merge(graphdef, state)(ids, attention_mask=mask)

    @jax.jit
    def decode(state, cache, ids, mask):
        return nnx.merge(graphdef, state).decode(cache, ids, attention_mask=mask)

    return (lambda ids, mask=None: np.asarray(forward(state, jnp.asarray(ids), mask)),
            lambda cache, ids, mask=None: decode(state, cache, jnp.asarray(ids), mask), model)


def reference(variant: str, ids: np.ndarray | None, **kwargs) -> np.ndarray:
    with torch.no_grad():
        ids = None if ids is None else torch.tensor(ids)
        return hf_model(variant)(ids, **kwargs).logits.float().numpy()


def assert_close(ours_logits, ref_logits, rel=1e-4):
    err = np.abs(ours_logits - ref_logits).max()
    assert err <= rel * np.abs(ref_logits).max(), f"max abs diff {err}, max |logits| {np.abs(ref_logits).max()}"


def random_ids(batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(3, VOCAB, (batch, length))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_match_transformers(variant):
    ids = random_ids(2, 19)
    forward, _, _ = jitted(variant)
    assert_close(forward(ids), reference(variant, ids))


def padded(rows: list[np.ndarray], side: str) -> tuple[np.ndarray, np.ndarray]:
    length = max(len(r) for r in rows)
    ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        span = slice(length - len(row), length) if side == "left" else slice(0, len(row))
        ids[i, span], mask[i, span] = row, 1
    return ids, mask


@pytest.mark.parametrize("variant", ["gqa", "mistral"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_unpadded_sequences(variant, side):
    rows = [random_ids(1, n, seed=n)[0] for n in (17, 9, 13)]
    ids, mask = padded(rows + [np.zeros(0, np.int64)], side)  # the last row is all padding
    forward, _, _ = jitted(variant)
    logits = forward(ids, jnp.asarray(mask))
    assert np.isfinite(logits).all()
    for i, row in enumerate(rows):
        real = mask[i].astype(bool)
        assert_close(logits[i, real], reference(variant, row[None])[0])
    # transformers on the padded batch with the same positions agrees too.
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ref = reference(variant, ids, attention_mask=torch.tensor(mask), position_ids=torch.tensor(positions))
    assert_close(logits[mask.astype(bool)], ref[mask.astype(bool)])


def test_inputs_embeds_match_transformers():
    ids = random_ids(2, 11)
    model = ours("gqa")
    embeds = model.embed(jnp.asarray(ids))
    assert embeds.shape == (2, 11, 60)
    ref = reference("gqa", None, inputs_embeds=torch.tensor(np.asarray(embeds)))
    assert_close(np.asarray(model(inputs_embeds=embeds)), ref)


@pytest.mark.parametrize("variant", ["gqa", "mistral"])
def test_kv_cache_matches_full_forward_left_padded(variant):
    """Prefill of a left-padded prompt batch, then one-token steps: every step's logits equal the full
    forward over prompt + steps (mistral: the sliding window of 7 is crossed)."""
    rows = [random_ids(1, n, seed=n)[0] for n in (8, 5)]
    prompt, prompt_mask = padded(rows, "left")
    steps = random_ids(2, 6, seed=7)
    forward, decode, model = jitted(variant)
    full_ids = np.concatenate([prompt, steps], axis=1)
    full_mask = np.concatenate([prompt_mask, np.ones_like(steps, np.int32)], axis=1)
    full = forward(full_ids, jnp.asarray(full_mask))

    cache = model.init_cache(2, full_ids.shape[1] + 3, jnp.float32)
    logits, cache = decode(cache, prompt, jnp.asarray(prompt_mask))
    real = prompt_mask.astype(bool)
    assert_close(np.asarray(logits)[real], full[:, :prompt.shape[1]][real])
    for t in range(steps.shape[1]):
        logits, cache = decode(cache, steps[:, t:t + 1], None)
        assert_close(np.asarray(logits)[:, 0], full[:, prompt.shape[1] + t])
    assert int(cache.index) == full_ids.shape[1]


def greedy(decode, model, prompt, prompt_mask, new_tokens):
    cache = model.init_cache(prompt.shape[0], prompt.shape[1] + new_tokens)
    logits, cache = decode(cache, prompt, jnp.asarray(prompt_mask))
    out = []
    for _ in range(new_tokens):
        token = jnp.argmax(logits[:, -1], axis=-1)[:, None]
        out.append(np.asarray(token))
        logits, cache = decode(cache, token, None)
    return np.concatenate(out, axis=1)


@pytest.mark.parametrize("variant", ["llama3", "mistral"])
def test_greedy_generation_matches_transformers_generate(variant):
    rows = [random_ids(1, n, seed=n + 20)[0] for n in (9, 4)]
    prompt, prompt_mask = padded(rows, "left")
    _, decode, model = jitted(variant)
    with torch.no_grad():
        ref = hf_model(variant).generate(torch.tensor(prompt), attention_mask=torch.tensor(prompt_mask),
                                         max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = ref[:, prompt.shape[1]:].numpy()
    assert expected.shape == (2, 20)
    np.testing.assert_array_equal(greedy(decode, model, prompt, prompt_mask, 20), expected)


def loss_and_grads(variant, ids, **runtime):
    model = ours(variant, **runtime)
    graphdef, state = nnx.split(model)

    @jax.jit
    def loss_fn(state):
        logits = nnx.merge(graphdef, state)(ids)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], axis=-1))

    loss, grads = jax.value_and_grad(loss_fn)(state)
    return float(loss), grads


def layer_structure(model: LlamaForCausalLM) -> tuple[int, int]:
    """(scan loops, rematerialized blocks) in the forward jaxpr."""
    graphdef, state = nnx.split(model)
    jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(graphdef, s)(jnp.zeros((1, 4), jnp.int32)))(state))
    return jaxpr.count("scan["), jaxpr.count("remat")


def test_scan_loop_and_remat_agree():
    # The runtime fields really change the program: one scan or an unrolled loop, remat per layer.
    assert layer_structure(ours("gqa")) == (1, 0)
    assert layer_structure(ours("gqa", scan_layers=False, remat="full")) == (0, 3)
    assert layer_structure(ours("gqa", remat="dots")) == (1, 1)
    ids = jnp.asarray(random_ids(2, 13))
    loss, grads = loss_and_grads("gqa", ids)
    for runtime in (dict(scan_layers=False, remat="full"), dict(scan_layers=True, remat="dots")):
        other_loss, other_grads = loss_and_grads("gqa", ids, **runtime)
        assert abs(other_loss - loss) <= 1e-6 * abs(loss), runtime
        for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(other_grads)):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6, err_msg=str(runtime))


def test_bfloat16_forward_close_to_float32():
    ids = random_ids(2, 19)
    f32 = jitted("gqa")[0](ids)
    bf16 = jitted("gqa", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)[0](ids)
    assert bf16.dtype == np.float32  # logits are float32 whatever the compute dtype
    # bfloat16 keeps 8 significant bits (relative rounding 2**-9 = 0.2%); a logit goes through ~10 roundings
    # (weights, activations, residual adds, norms, 3 layers), each up to 0.2% of O(max|logits|) values, so
    # errors of 1-2% of max|logits| are expected (measured: 1.1-1.9% on these tiny models). 5% leaves margin
    # while a wrong op in the bf16 path (a norm or rope computed in the wrong dtype/order) is off by O(10%+).
    assert_close(bf16, f32, rel=5e-2)
    assert np.mean(bf16.argmax(-1) == f32.argmax(-1)) >= 0.9


# Hugging Face config.json of the preset checkpoints (legacy rope_theta / rope_scaling form).
HF_PRESET_CONFIGS = {
    "vicuna_7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, max_position_embeddings=4096,
                      num_attention_heads=32, num_hidden_layers=32, num_key_value_heads=32, rms_norm_eps=1e-5,
                      rope_scaling=None, tie_word_embeddings=False, vocab_size=32000, pad_token_id=0),
    "vicuna_13b": dict(model_type="llama", hidden_size=5120, intermediate_size=13824, max_position_embeddings=4096,
                       num_attention_heads=40, num_hidden_layers=40, num_key_value_heads=40, rms_norm_eps=1e-5,
                       rope_scaling=None, tie_word_embeddings=False, vocab_size=32000, pad_token_id=0),
    "llama3_1_8b": dict(model_type="llama", attention_bias=False, hidden_size=4096, intermediate_size=14336,
                        max_position_embeddings=131072, mlp_bias=False, num_attention_heads=32, num_hidden_layers=32,
                        num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                        rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=8192, rope_type="llama3"),
                        tie_word_embeddings=False, vocab_size=128256),
    "mistral_7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, max_position_embeddings=32768,
                       num_attention_heads=32, num_hidden_layers=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                       rope_theta=10000.0, sliding_window=4096, tie_word_embeddings=False, vocab_size=32000),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_equal_hf_configs_and_param_counts(name):
    hf_dict = HF_PRESET_CONFIGS[name]
    assert llama_config_from_hf(hf_dict) == PRESETS[name]
    config = transformers.AutoConfig.for_model(**{"model_type": hf_dict["model_type"]},
                                               **{k: v for k, v in hf_dict.items() if k != "model_type"})
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(config)
    assert count_params(PRESETS[name]) == sum(p.numel() for p in hf.parameters())


def effective(hf_config, field):
    """A field's value as the transformers model uses it (qwen2 derives head_dim when it is unset)."""
    value = getattr(hf_config, field, None)
    if field == "head_dim" and value is None:
        return hf_config.hidden_size // hf_config.num_attention_heads
    return value


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_round_trip_through_hf(variant):
    cfg = llama_config_from_hf(hf_model(variant).config)
    d = llama_config_to_hf(cfg)
    assert llama_config_from_hf(d) == cfg
    rebuilt = transformers.AutoConfig.for_model(d["model_type"], **{k: v for k, v in d.items() if k != "model_type"})
    source = hf_model(variant).config
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                  "tie_word_embeddings", "attention_bias", "mlp_bias", "sliding_window"):
        assert effective(rebuilt, field) == effective(source, field), field
    assert {k: v for k, v in rebuilt.rope_parameters.items() if k != "type"} == \
        {k: v for k, v in source.rope_parameters.items() if k != "type"}
    if d["model_type"] == "llama":
        assert transformers.LlamaConfig(**d).to_dict()["rope_parameters"] == rebuilt.rope_parameters


def test_unsupported_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="unsupported decoder model_type 'gpt2'"):
        llama_config_from_hf({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})
    with pytest.raises(ValueError, match="rope_type 'yarn'"):
        llama_config_from_hf(dict(model_type="llama", rope_theta=1e4,
                                  rope_scaling=dict(rope_type="yarn", factor=4.0)))
    with pytest.raises(ValueError, match="even head_dim"):
        LlamaConfig(**TINY, head_dim=15)
    with pytest.raises(ValueError, match="is not a multiple of num_key_value_heads 4"):
        LlamaConfig(**{**TINY, "num_key_value_heads": 4})
    model = ours("gqa")
    with pytest.raises(ValueError, match="exceed the cache length 8"):
        model.decode(model.init_cache(1, 8), jnp.zeros((1, 9), jnp.int32))


def test_parameters_carry_logical_axes():
    params = dict(nnx.to_flat_state(nnx.state(ours("gqa"), nnx.Param)))
    expected = {
        ("model", "embed_tokens", "weight"): ("vocab", "embed"),
        ("model", "layers", "self_attn", "q_proj", "weight"): ("layers", "heads", "embed"),
        ("model", "layers", "self_attn", "k_proj", "weight"): ("layers", "kv", "embed"),
        ("model", "layers", "self_attn", "o_proj", "weight"): ("layers", "embed", "heads"),
        ("model", "layers", "mlp", "down_proj", "weight"): ("layers", "embed", "mlp"),
        ("model", "layers", "input_layernorm", "weight"): ("layers", "embed"),
        ("model", "norm", "weight"): ("embed",),
        ("lm_head", "weight"): ("vocab", "embed"),
    }
    for path, axes in expected.items():
        leaf = params[path]
        assert leaf.get_metadata()["out_sharding"] == axes, path
        assert len(axes) == leaf.get_value().ndim, path


@pytest.mark.parametrize("variant", ["gqa", "mistral"])
def test_unstacked_layers_match_transformers(variant):
    """Per-layer weight buffers (the fast GPU decode layout): the same forward logits and greedy tokens."""
    model = ours(variant)
    model.model.unstack_layers()
    assert len(model.model.layers) == 3
    assert model.model.layers[1].mlp.up_proj.weight.get_metadata()["out_sharding"] == ("mlp", "embed")
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids))
    decode = jax.jit(lambda s, cache, ids, mask: nnx.merge(graphdef, s).decode(cache, ids, attention_mask=mask))
    ids = random_ids(2, 19)
    assert_close(np.asarray(forward(state, jnp.asarray(ids))), reference(variant, ids))
    rows = [random_ids(1, n, seed=n + 20)[0] for n in (9, 4)]
    prompt, prompt_mask = padded(rows, "left")
    with torch.no_grad():
        ref = hf_model(variant).generate(torch.tensor(prompt), attention_mask=torch.tensor(prompt_mask),
                                         max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    tokens = greedy(lambda c, i, m: decode(state, c, jnp.asarray(i), m), model, prompt, prompt_mask, 12)
    np.testing.assert_array_equal(tokens, ref[:, prompt.shape[1]:].numpy())


@pytest.mark.parametrize("unstacked", [False, True])
def test_decode_step_updates_the_cache_in_place(unstacked):
    """A donated one-token step writes its slots into the cache buffers it was given and needs far less scratch
    memory than one cache tensor: no per-step copy of the cache (the former [L, B, S, K, D] scan-output layout
    needed 2.5 cache tensors of scratch here)."""
    config = LlamaConfig(**{**TINY, "num_hidden_layers": 7, "num_key_value_heads": 2, "head_dim": 14})
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    if unstacked:
        model.model.unstack_layers()
    graphdef, state = nnx.split(model)
    step = jax.jit(lambda s, cache, ids: nnx.merge(graphdef, s).decode(cache, ids), donate_argnums=1)
    _, cache = step(state, model.init_cache(3, 1021), jnp.ones((3, 5), jnp.int32))
    assert cache.key.shape == (7, 3, 2, 1021, 14)  # [L, B, K, S, head_dim]
    ids = jnp.full((3, 1), 7, jnp.int32)
    scratch = step.lower(state, cache, ids).compile().memory_analysis().temp_size_in_bytes
    assert scratch < 0.75 * cache.key.nbytes, (scratch, cache.key.nbytes)
    pointers = cache.key.unsafe_buffer_pointer(), cache.value.unsafe_buffer_pointer()
    _, after = step(state, cache, ids)
    assert (after.key.unsafe_buffer_pointer(), after.value.unsafe_buffer_pointer()) == pointers
    assert int(after.index) == 6 and np.abs(np.asarray(after.key[:, :, :, 5])).max() > 0
