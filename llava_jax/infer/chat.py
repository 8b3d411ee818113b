"""Terminal chat with a LLaVA model: `python -m llava_jax.chat --model PATH [--image FILE ...] [--video V] ...`.

Like the official `llava.serve.cli`: the images (`--image`, repeatable; several need a LLaVA-NeXT / OneVision
model to be meaningful) and a `--video` (file or frame folder, LLaVA-OneVision) are attached to the first user
turn (`<image>`s then `<video>`, a newline, the text); every turn re-renders the whole conversation with the
template and streams the answer, an empty line or end of input ends the chat. `--prompt TEXT` answers once and
exits (the answer alone on stdout).

The template is `--template`, else the training workdir's, else `default_template` of the model folder's name
(llava_v1 for LLaVA-1.5 / v1 Vicuna models). Bad input (missing model folder, unreadable image, a conversation
longer than the model's context) prints one `error: ...` line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence, TextIO

from llava_jax import cli
from llava_jax.data.conversation import IMAGE_TOKEN, VIDEO_TOKEN, generation_prompt
from llava_jax.data.errors import BadSample
from llava_jax.models.dtypes import DTYPES


class ChatError(Exception):
    """Bad user input; the message is printed as one line."""


class Chat:
    """A multi-turn conversation over a `Generator`.

    Args:
      generator: the model's Generator (its template renders the turns).
      image: a PIL image (or a list of them) attached to the first user turn, or None.
      video: a `media.Video` attached to the first user turn after the images (LLaVA-OneVision), or None.
      max_new_tokens, temperature, top_p: generation settings of every answer.
      seed: PRNG seed of sampling; each turn folds in its turn number.
    """

    def __init__(self, generator, image=None, *, video=None, max_new_tokens: int = 512, temperature: float = 0.2,
                 top_p: float = 1.0, seed: int = 0):
        if generator.template is None:
            raise ChatError("the chat needs a conversation template")
        self.generator = generator
        images = [] if image is None else list(image) if isinstance(image, (list, tuple)) else [image]
        self.header = IMAGE_TOKEN * len(images) + VIDEO_TOKEN * (video is not None)  # placeholders of turn one
        self.media = images + ([video] if video is not None else [])
        if generator.is_anyres and self.media:  # tiles and token counts once for the whole chat
            try:
                self.media = generator.prepare_media(self.media)
            except ValueError as e:
                raise ChatError(str(e)) from None
        self.max_new_tokens, self.temperature, self.top_p, self.seed = max_new_tokens, temperature, top_p, seed
        self.messages: list[str] = []

    def ask(self, text: str, stream: Callable[[str], None] | None = None) -> str:
        """Answers one user message (streaming pieces of the answer to `stream`) and records the turn."""
        import jax

        text = text.replace(IMAGE_TOKEN, "").replace(VIDEO_TOKEN, "").strip()  # media come from the flags only
        if not text:
            raise ChatError("empty message")
        if not self.messages and self.header:
            text = self.header + "\n" + text
        gen = self.generator
        prompt = generation_prompt(gen.template, [*self.messages, text])
        try:
            length = gen.encode(prompt, self.media if gen.is_anyres else ()).size
        except ValueError as e:
            raise ChatError(str(e)) from None
        room = gen.context_length - length
        if room < 1:
            raise ChatError(f"the conversation is {length} tokens long, the model's context is "
                            f"{gen.context_length} tokens")
        images = [self.media] if self.media else None
        try:
            answer = gen.generate([prompt], images, max_new_tokens=min(self.max_new_tokens, room),
                                  temperature=self.temperature, top_p=self.top_p,
                                  rng=jax.random.fold_in(jax.random.key(self.seed), len(self.messages)),
                                  stream=(lambda _, piece: stream(piece)) if stream else None)[0]
        except ValueError as e:
            raise ChatError(str(e)) from None
        self.messages += [text, answer.strip()]
        return answer.strip()


def build_parser() -> argparse.ArgumentParser:
    from llava_jax.models.quant import add_quantize_argument

    parser = argparse.ArgumentParser(prog="python -m llava_jax.chat", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True,
                        help="a Hugging Face LLaVA folder, a llava_jax folder (convert.save) or a training workdir")
    parser.add_argument("--image", action="append", default=[],
                        help="image file attached to the first turn (repeat for several, in order)")
    parser.add_argument("--video", help="video file or folder of frame images attached to the first turn, after "
                                        "the images (LLaVA-OneVision models)")
    parser.add_argument("--video-frames", type=int, default=32,
                        help="frames sampled uniformly from --video (default 32, as LLaVA-OneVision)")
    parser.add_argument("--template", help="conversation template (default: chosen from the model)")
    parser.add_argument("--prompt", help="answer this one message and exit")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.2, help="0 = greedy (official CLI default 0.2)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=tuple(DTYPES),
                        help="compute and storage dtype (default: the checkpoint's)")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: the model folder)")
    add_quantize_argument(parser)
    parser.add_argument("--warm-up", action="store_true",
                        help="compile every prompt length's programs before the first turn (kept in the model's "
                             "persistent compilation cache), so no turn waits for a compile")
    return parser


def _open_chat(args) -> Chat:
    from llava_jax.data.images import load_image
    from llava_jax.infer.loading import ModelLoadError, load_generator
    from llava_jax.infer.media import read_video

    if args.video_frames < 1:
        raise ChatError(f"--video-frames must be >= 1, got {args.video_frames}")
    try:
        images = [load_image(path, exif_transpose=True) for path in args.image]
        video = read_video(args.video, args.video_frames) if args.video is not None else None
    except BadSample as e:
        raise ChatError(str(e)) from None
    try:
        generator = load_generator(args.model, dtype=args.dtype, template=args.template, tokenizer=args.tokenizer,
                                   quantize=args.quantize)
    except (ModelLoadError, FileNotFoundError) as e:
        raise ChatError(str(e)) from None
    if images and not generator.is_llava:
        raise ChatError(f"{args.model} is a text-only model; it cannot take --image")
    if video is not None and generator.video_token_index is None:
        raise ChatError(f"--video: {args.model} takes no videos (only LLaVA-OneVision models do)")
    if args.warm_up:
        generator.warm_up(images=(len(images),), max_new_tokens=args.max_new_tokens,
                          greedy=args.temperature == 0, stream=True, progress=_progress_line)
    return Chat(generator, images or None, video=video, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, top_p=args.top_p, seed=args.seed)


def _progress_line(line: str) -> None:
    print(f"\r{line:<72}", end="", file=sys.stderr, flush=True)


def _write(out: TextIO) -> Callable[[str], None]:
    def write(piece: str) -> None:
        out.write(piece)
        out.flush()

    return write


def interact(chat: Chat, stdin: TextIO, stdout: TextIO) -> None:
    """The interactive loop: `USER: ` prompt, streamed `ASSISTANT: ` answer; ends at an empty line or EOF."""
    user, assistant = chat.generator.template.roles
    user, assistant = (user or "USER").strip(), (assistant or "ASSISTANT").strip()
    while True:
        stdout.write(f"{user}: ")
        stdout.flush()
        line = stdin.readline()
        if not line or not line.strip():
            stdout.write("\n")
            return
        stdout.write(f"{assistant}: ")
        chat.ask(line.strip(), stream=_write(stdout))
        stdout.write("\n")
        stdout.flush()


@cli.command(ChatError)
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1:
        raise cli.UsageError("--max-new-tokens must be >= 1")
    try:
        chat = _open_chat(args)
        if args.prompt is not None:
            chat.ask(args.prompt, stream=_write(sys.stdout))
            sys.stdout.write("\n")
        else:
            interact(chat, sys.stdin, sys.stdout)
    except KeyboardInterrupt:
        sys.stdout.write("\n")
    return 0


__all__ = ["Chat", "ChatError", "interact", "main", "build_parser"]
