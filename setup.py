"""llava_jax: LLaVA and LLaVA-1.5 in JAX / Flax NNX."""

from setuptools import find_packages, setup

setup(
    name="llava_jax",
    version="0.1.0",
    description="JAX/Flax reimplementation of LLaVA and LLaVA-1.5 (visual instruction tuning).",
    packages=find_packages(include=["llava_jax", "llava_jax.*"]),
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
        "ml_collections>=1.1,<2",
        "pillow>=13,<14",
        "etils[epath]>=1.15",
        "numpy>=2.4,<3",
        "tensorboardX>=2.6",
        "tqdm>=4.70",
    ],
    extras_require={
        # Ahead-of-time compilation for TPU topologies on any host (python -m llava_jax.plan --topology=v5p-64).
        "tpu": ["jax[tpu]>=0.10.2,<0.11"],
        "test": [
            "pytest>=9,<10",
            # CPU build of PyTorch: the reference implementation in parity tests.
            "torch==2.13.0",
            # LoRA reference (the official LLaVA trains LoRA with peft).
            "peft>=0.21.2,<0.22",
        ],
    },
)
