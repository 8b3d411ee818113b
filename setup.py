"""llava_jax: LLaVA and LLaVA-1.5 in JAX / Flax NNX."""

from setuptools import find_packages, setup

SERVE = [
    "fastapi>=0.115,<1",
    "uvicorn>=0.30,<1",
    "httpx>=0.27,<1",
    "openai>=1.40,<4",
    "gradio>=6,<7",
]

setup(
    name="llava_jax",
    version="0.1.0",
    description="JAX/Flax reimplementation of LLaVA and LLaVA-1.5 (visual instruction tuning).",
    packages=find_packages(include=["llava_jax", "llava_jax.*"]),
    # Few-shot prompts of the instruction-data generator and the judges' default rules.
    package_data={"llava_jax.data": ["prompts/*/*.txt"], "llava_jax.infer": ["judge_rules.json"]},
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2,<0.11",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.8,<0.13",
        "transformers>=5.23,<6",
        "tokenizers>=0.23,<0.24",
        "sentencepiece>=0.2,<0.3",
        "protobuf>=5",
        "safetensors>=0.8,<0.9",
        "tensorflow-datasets>=4.9.10,<5",
        "array-record>=0.8,<0.9",
        "grain>=0.2.18,<0.3",
        "einops>=0.8,<0.9",
        "qwix>=0.1.8,<0.2",  # weight-only quantization numerics (llava_jax.models.quant)
        "ml_collections>=1.1,<2",
        "pillow>=12.3,<14",  # gradio (the serve extra) still requires pillow < 13
        "etils[epath]>=1.15",
        "numpy>=2.4,<3",
        "tensorboardX>=2.6",
        "tqdm>=4.70",
        "xxhash>=3.4,<5",  # checkpoint checksums
    ],
    extras_require={
        # The OpenAI-compatible server and the web chat (python -m llava_jax.serve).
        "serve": SERVE,
        # Video samples given as files (mp4, webm, ...); folders of frames need nothing more.
        "video": ["av>=14,<19"],
        # GPT-assisted data generation and judged benchmarks (any OpenAI-compatible endpoint).
        "judge": ["openai>=1.40,<4", "openpyxl>=3.1,<4"],
        # Ahead-of-time compilation for TPU topologies on any host (python -m llava_jax.plan --topology=v5p-64).
        "tpu": ["jax[tpu]>=0.10.2,<0.11"],
        "test": [
            *SERVE,
            # Drives the system Chromium in the web chat's browser test.
            "playwright>=1.45,<2",
            "openpyxl>=3.1,<4",
            # Runs the official MMBench runner and submission conversion side by side.
            "pandas>=2",
            "pytest>=9,<10",
            # The linter CI runs (settings in ruff.toml).
            "ruff>=0.17,<0.18",
            # CPU build of PyTorch: the reference implementation in parity tests.
            "torch==2.13.0",
            # LoRA reference (the official LLaVA trains LoRA with peft).
            "peft>=0.21.2,<0.22",
            # Video files in the data tests.
            "av>=14,<19",
        ],
    },
)
