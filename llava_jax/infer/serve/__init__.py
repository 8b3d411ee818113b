"""Serving: an OpenAI-compatible HTTP server and a web chat over one batching engine.

    python -m llava_jax.serve --model DIR [--host 127.0.0.1] [--port 8000] [--max-batch 16] [--ui]

`engine` (the model's thread, request queue, batching), `protocol` (requests -> jobs, images, limits), `app`
(FastAPI routes), `web` (the Gradio chat), `cli` (the command), `bench` (concurrent vs one-by-one throughput).
"""
