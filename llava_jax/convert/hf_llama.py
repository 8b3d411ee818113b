"""Hugging Face config <-> LlamaConfig for the LLaMA-family decoders (llama, mistral, qwen2).

The parameter names need no table: `llava_jax.models.llama` mirrors transformers' module tree, so
`llava_jax.convert.params.load_state_dict(model, hf_state_dict)` / `state_dict(model)` convert weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import transformers

from llava_jax.models.llama import LlamaConfig

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_RUNTIME_FIELDS = ("dtype", "param_dtype", "scan_layers", "remat", "attention_impl")


def llama_tensor_name_to_ours(name: str) -> str | None:
    """Checkpoint names are ours already; rotary caches old checkpoints carry are skipped."""
    return None if name.endswith(".rotary_emb.inv_freq") else name


def _as_hf_config(hf_config: Mapping[str, Any] | transformers.PretrainedConfig) -> transformers.PretrainedConfig:
    """A dict (config.json contents) or a transformers config -> a transformers config with defaults filled
    in and rope parameters standardized by transformers itself."""
    if isinstance(hf_config, transformers.PretrainedConfig):
        model_type = hf_config.model_type
    else:
        model_type = hf_config.get("model_type", "llama")
    if model_type not in SUPPORTED_MODEL_TYPES:
        arch = (hf_config.get("architectures") if isinstance(hf_config, Mapping)
                else getattr(hf_config, "architectures", None))
        raise ValueError(f"unsupported decoder model_type {model_type!r} (architectures {arch}); "
                         f"supported: {SUPPORTED_MODEL_TYPES}")
    if isinstance(hf_config, transformers.PretrainedConfig):
        return hf_config
    fields = {k: v for k, v in hf_config.items() if k != "model_type"}
    return transformers.AutoConfig.for_model(model_type, **fields)


def _sliding_window(hf: transformers.PretrainedConfig) -> int | None:
    if hf.model_type == "mistral":
        return hf.sliding_window
    if hf.model_type == "qwen2" and "sliding_attention" in (hf.layer_types or ()):
        raise ValueError("qwen2 config: sliding-window layers (use_sliding_window=True) are not supported")
    return None


def llama_config_from_hf(hf_config: Mapping[str, Any] | transformers.PretrainedConfig,
                         **runtime: Any) -> LlamaConfig:
    """Hugging Face decoder config (dict or transformers config) -> LlamaConfig.

    runtime: dtype, param_dtype, scan_layers, remat, attention_impl.
    """
    unknown = set(runtime) - set(_RUNTIME_FIELDS)
    if unknown:
        raise TypeError(f"llama_config_from_hf: unknown runtime fields {sorted(unknown)}; allowed {_RUNTIME_FIELDS}")
    hf = _as_hf_config(hf_config)
    if hf.hidden_act != "silu":
        raise ValueError(f"{hf.model_type} config: hidden_act {hf.hidden_act!r} is not supported (only 'silu')")
    rope = dict(hf.rope_parameters or {})
    qwen2 = hf.model_type == "qwen2"
    return LlamaConfig(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_hidden_layers=hf.num_hidden_layers,
        num_attention_heads=hf.num_attention_heads,
        num_key_value_heads=hf.num_key_value_heads or hf.num_attention_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        rms_norm_eps=hf.rms_norm_eps,
        rope_theta=rope.get("rope_theta", getattr(hf, "rope_theta", None) or 10000.0),
        rope_scaling=rope if rope.get("rope_type", "default") != "default" else None,
        max_position_embeddings=hf.max_position_embeddings,
        attention_bias=True if qwen2 else bool(getattr(hf, "attention_bias", False)),
        o_proj_bias=False if qwen2 else bool(getattr(hf, "attention_bias", False)),
        mlp_bias=bool(getattr(hf, "mlp_bias", False)),
        sliding_window=_sliding_window(hf),
        tie_word_embeddings=bool(hf.tie_word_embeddings),
        **runtime,
    )


def hf_model_type(cfg: LlamaConfig) -> str:
    """The Hugging Face model_type of a decoder config (llama, mistral or qwen2); ValueError where none fits."""
    if cfg.attention_bias and not cfg.o_proj_bias:
        if cfg.mlp_bias or cfg.sliding_window is not None:
            raise ValueError("LlamaConfig with q/k/v biases only (qwen2) cannot also have mlp_bias or a sliding "
                             "window in a Hugging Face config")
        return "qwen2"
    if cfg.o_proj_bias and not cfg.attention_bias:
        raise ValueError("LlamaConfig with an o_proj bias but no q/k/v biases has no Hugging Face equivalent")
    if cfg.sliding_window is not None:
        if cfg.attention_bias or cfg.mlp_bias:
            raise ValueError("LlamaConfig with a sliding window (mistral) cannot have attention or MLP biases")
        return "mistral"
    return "llama"


def llama_config_to_hf(cfg: LlamaConfig) -> dict[str, Any]:
    """LlamaConfig -> Hugging Face config dict (model_type llama, or mistral / qwen2 where needed).

    `transformers.LlamaConfig(**d)` (or `AutoConfig.for_model(d["model_type"], **rest)`) accepts it.
    """
    model_type = hf_model_type(cfg)
    rope_parameters = {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": float(cfg.rope_theta)}
    d = {
        "model_type": model_type,
        "architectures": [_ARCHITECTURES[model_type]],
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_parameters": rope_parameters,
        "tie_word_embeddings": cfg.tie_word_embeddings,
    }
    if model_type == "llama":
        d.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)
    if model_type == "mistral":
        d["sliding_window"] = cfg.sliding_window
    if model_type == "qwen2":
        d.update(use_sliding_window=False, sliding_window=None)
    return d


def write_llama_preprocessing(model, path: Path, tokenizer, image_processor, chat_template) -> None:
    """A decoder export holds its tokenizer (when given) and nothing else to preprocess with."""
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
