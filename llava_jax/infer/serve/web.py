"""The web chat (`python -m llava_jax.serve --model DIR --ui`, at /ui): a Gradio page like the official LLaVA
demo, on the same FastAPI app and the same engine as the API.

Upload, drop or paste one or several images (and, for a model that takes videos, LLaVA-OneVision, a video), ask,
and the answer streams in; the conversation goes on over several turns. Every turn goes through the API's own
path (`protocol.prepare`, then the engine): the images, in order, then the video are attached to the first user
turn as `data:` URLs, as the chat CLI attaches its `--image` files and `--video`, so greedy answers equal the
CLI's; what `prepare` refuses (too many images, too large a file) shows as the chat's error. Temperature, top-p
and max output tokens are sliders; Regenerate asks the last question again, Clear starts over; examples are demo
scenes drawn at start-up. With `--api-key` the page asks for a login whose password is the key.
"""

from __future__ import annotations

import base64
import hmac
import mimetypes
import os
import queue
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from llava_jax.infer.serve.app import ServerConfig, submit
from llava_jax.infer.serve.engine import Delta, Engine, Failed, Finished
from llava_jax.infer.serve.protocol import ApiError, ChatRequest, prepare

def _examples():
    """(demo scene, demo question) pairs."""
    from llava_jax.data.synthetic import QUESTIONS, SHORT_ANSWER_SUFFIX, Scene

    return [(Scene("circle", "red", (0,)), QUESTIONS["color"][0] + SHORT_ANSWER_SUFFIX),
            (Scene("square", "blue", (0, 1, 3)), QUESTIONS["count"][0] + SHORT_ANSWER_SUFFIX),
            (Scene("triangle", "yellow", (2,)), QUESTIONS["shape"][0] + SHORT_ANSWER_SUFFIX),
            (Scene("diamond", "purple", (1,)), QUESTIONS["position"][0] + SHORT_ANSWER_SUFFIX)]


def mount_ui(app, engine: Engine, config: ServerConfig, path: str = "/ui"):
    """Adds the web chat to `app` at `path`."""
    import gradio as gr

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    auth = None
    if config.api_key is not None:
        key = config.api_key
        auth = lambda _user, password: hmac.compare_digest(password.encode(), key.encode())  # noqa: E731
    return gr.mount_gradio_app(app, build_ui(engine, config, app.state.tokenizer_lock), path=path, auth=auth,
                               ssr_mode=False, footer_links=[])


class _Handlers:
    """The page's event handlers: each turn is an API request through `prepare` and the engine."""

    def __init__(self, engine: Engine, config: ServerConfig, tokenizer_lock):
        self.engine, self.config, self.tokenizer_lock = engine, config, tokenizer_lock

    def ask(self, history, images, video, text, temperature, top_p, max_tokens) -> Iterator:
        import gradio as gr

        text = (text or "").strip()
        if not text:
            raise gr.Error("Type a question first.")
        history = [*history, {"role": "user", "content": text}]
        for update in self.answer(history, images, video, temperature, top_p, max_tokens):
            yield update, ""

    def regenerate(self, history, images, video, temperature, top_p, max_tokens) -> Iterator:
        while history and history[-1]["role"] == "assistant":
            history = history[:-1]
        if history:
            yield from self.answer(history, images, video, temperature, top_p, max_tokens)

    def answer(self, history, images, video, temperature, top_p, max_tokens) -> Iterator:
        """Streams the answer to the conversation, `images` (the gallery's value) and `video` (a path or None)
        attached to its first turn: yields the history with the answer so far."""
        import gradio as gr

        messages = to_messages(history, gallery_paths(images), video)
        request = ChatRequest(messages=messages, temperature=temperature, top_p=top_p, max_tokens=int(max_tokens),
                              stream=True)
        events: queue.Queue = queue.Queue()
        try:
            prepared = prepare(request, self.engine.generator, self.config.limits, self.tokenizer_lock)
            job = submit(self.engine, prepared, events.put)
        except ApiError as e:
            raise gr.Error(e.message) from None
        reply = {"role": "assistant", "content": ""}
        yield [*history, reply]
        try:
            while not isinstance(event := events.get(), Finished):
                if isinstance(event, Failed):
                    raise gr.Error(event.message)
                reply["content"] += event.text if isinstance(event, Delta) else ""
                yield [*history, dict(reply)]
        finally:
            job.cancelled = True  # the page went away mid-answer: the row is dropped


def build_ui(engine: Engine, config: ServerConfig, tokenizer_lock):
    """The chat page: images (a gallery), a video input only for models that take videos, settings, the chat."""
    import gradio as gr

    handlers = _Handlers(engine, config, tokenizer_lock)
    with gr.Blocks(title="llava_jax chat", analytics_enabled=False) as ui:
        gr.Markdown(f"### llava_jax · `{config.model_name}`")
        with gr.Row():
            with gr.Column(scale=2):
                images = gr.Gallery(type="filepath", file_types=["image"], sources=["upload", "clipboard"],
                                    label="Images (upload, drop or paste)", height=260, columns=3, interactive=True,
                                    elem_id="images")
                # a file input, not gr.Video: the model decodes what the browser may not play (e.g. MPEG-4 Part 2)
                video = gr.File(file_types=["video"], type="filepath", label="Video (upload or drop)",
                                visible=engine.generator.video_token_index is not None, elem_id="video")
                temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature (0 = greedy)",
                                        elem_id="temperature")
                top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top P", elem_id="top_p")
                max_tokens = gr.Slider(1, config.limits.max_tokens, value=min(256, config.limits.max_tokens), step=1,
                                       label="Max output tokens", elem_id="max_tokens")
            with gr.Column(scale=5):
                chatbot = gr.Chatbot(label="Conversation", height=420, elem_id="chatbot")
                text = gr.Textbox(placeholder="Ask about the images and press Enter", label="Question",
                                  show_label=False, elem_id="question")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    again = gr.Button("Regenerate", elem_id="regenerate")
                    clear = gr.Button("Clear", elem_id="clear")
        gr.Examples([[[path], question] for path, question in example_files()], inputs=[images, text])
        settings = [temperature, top_p, max_tokens]
        for trigger in (send.click, text.submit):
            trigger(handlers.ask, [chatbot, images, video, text, *settings], [chatbot, text])
        again.click(handlers.regenerate, [chatbot, images, video, *settings], [chatbot])
        clear.click(lambda: ([], None, None, ""), None, [chatbot, images, video, text])
    return ui


def to_messages(history: list[dict], images: Sequence[str] = (), video: str | None = None) -> list[dict]:
    """The chat's turns as API messages, the images (file paths, in order) then the video (a file path) attached
    to the first user turn as `image_url` / `video_url` parts with `data:` URLs, before its text."""
    messages = [{"role": turn["role"], "content": _content_text(turn["content"])} for turn in history]
    media = [{"type": "image_url", "image_url": {"url": data_url(path)}} for path in images]
    if video:
        media.append({"type": "video_url", "video_url": {"url": data_url(video)}})
    if media:
        messages[0]["content"] = [*media, {"type": "text", "text": messages[0]["content"]}]
    return messages


def gallery_paths(value) -> list[str]:
    """A Gallery's value (None, or (path, caption) pairs) as its file paths, in order."""
    return [item[0] if isinstance(item, (tuple, list)) else item for item in value or []]


def data_url(path: str) -> str:
    """A file as a `data:<type>;base64,` URL (the type guessed from its name)."""
    kind = mimetypes.guess_type(str(path))[0] or "application/octet-stream"
    return f"data:{kind};base64," + base64.b64encode(Path(path).read_bytes()).decode()


def _content_text(content) -> str:
    """A Chatbot message's content (a string, or Gradio's list of text blocks) as text."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def example_files(image_size: int = 64) -> list[list[str]]:
    """[image path, question] rows: demo scenes drawn into a temporary folder with demo questions."""
    from llava_jax.data.synthetic import draw_scene

    out = Path(tempfile.mkdtemp(prefix="llava_jax_ui_"))
    rows = []
    for k, (scene, question) in enumerate(_examples()):
        path = out / f"{scene.color}_{scene.shape}_{k}.png"
        draw_scene(scene, image_size, np.random.default_rng(k)).save(path)
        rows.append([str(path), question])
    return rows


__all__ = ["mount_ui", "build_ui", "data_url", "gallery_paths", "to_messages"]
