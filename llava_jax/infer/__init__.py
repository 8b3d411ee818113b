"""Inference: KV-cache generation (`generate.Generator`, `generate.load_model`), the terminal chat (`chat`,
`python -m llava_jax.chat`), the evaluation runner (`evaluate.evaluate`, `python -m llava_jax.eval`), question
and answer files (`questions`), benchmark scorers (`scorers`, `python -m llava_jax.infer.score`), MMBench
question files and uploads (`mmbench`), the GPT judges of LLaVA-Bench and MM-Vet (`judge`,
`python -m llava_jax.judge`) and the generation benchmark (`bench`, `python -m llava_jax.bench generate`)."""
