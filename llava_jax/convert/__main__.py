"""Command line: convert checkpoints between Hugging Face and llava_jax.

    python -m llava_jax.convert --help
    python -m llava_jax.convert import-llava HF_DIR OUT_DIR [--dtype bfloat16]
    python -m llava_jax.convert import-clip-llm --clip CLIP_DIR --llm LLM_DIR OUT_DIR [--projector mlp2x_gelu]
    python -m llava_jax.convert import-original LLAVA_DIR OUT_DIR [--clip CLIP_DIR]
    python -m llava_jax.convert export OUR_DIR HF_DIR [--tokenizer TOK_DIR] [--max-shard-size 5GB]
    python -m llava_jax.convert quantize --model DIR --bits 8|4 [--group-size 128] --out OUT_DIR
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from llava_jax import cli
from llava_jax.models.dtypes import DTYPES

DESCRIPTION = """\
Convert checkpoints between Hugging Face folders and the llava_jax format.

The llava_jax format is a folder with model.json (model class and config) and params/ (an Orbax
checkpoint of the parameters). Read it in Python with `llava_jax.convert.load(dir)`. Nothing is
downloaded: every input is a local folder. `COMMAND --help` describes each command.

Typical flows:
  LLaVA-1.5 from Hugging Face (e.g. a local copy of llava-hf/llava-1.5-7b-hf):
      python -m llava_jax.convert import-llava ./llava-1.5-7b-hf ./ckpt/llava15
  Stage 1 start (CLIP tower + Vicuna, fresh projector):
      python -m llava_jax.convert import-clip-llm --clip ./clip-vit-large-patch14-336 \\
          --llm ./vicuna-7b-v1.5 ./ckpt/stage1_init
  Official LLaVA checkpoint (liuhaotian/llava-v1.5-7b; tower from the CLIP folder):
      python -m llava_jax.convert import-original ./llava-v1.5-7b ./ckpt/llava15 --clip ./clip-vit-large-patch14-336
  Back to Hugging Face (loads with LlavaForConditionalGeneration / AutoProcessor.from_pretrained):
      python -m llava_jax.convert export ./ckpt/llava15 ./llava15-hf --tokenizer ./vicuna-7b-v1.5
"""



def _add_dtype_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--param-dtype", choices=tuple(DTYPES), default=None,
                   help="storage dtype of the parameters (default: the checkpoint's, so bf16 stays bf16)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None,
                   help="compute dtype stored in the config (default: the parameter dtype)")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m llava_jax.convert", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_import_llava_args, _import_clip_llm_args, _import_original_args, _export_args, _quantize_args):
        add(sub)
    return parser


def _import_llava_args(sub) -> None:
    p = sub.add_parser("import-llava", help="Hugging Face LLaVA (or LLaMA / CLIP) folder -> llava_jax format",
                       description="Import a Hugging Face checkpoint folder: LlavaForConditionalGeneration (any "
                                   "on-disk layout, single or sharded safetensors, or pytorch_model.bin), and "
                                   "also a LLaMA-family causal LM or a CLIP model (detected from config.json).")
    p.add_argument("hf_dir", type=Path, help="folder with config.json and the weights")
    p.add_argument("out_dir", type=Path, help="output folder (llava_jax format)")
    _add_dtype_args(p)


def _import_clip_llm_args(sub) -> None:
    p = sub.add_parser("import-clip-llm", help="CLIP tower + LLaMA-family LLM -> LLaVA with a fresh projector",
                       description="Build LLaVA from a CLIP checkpoint (CLIPVisionModel or full CLIPModel; only "
                                   "the vision part is used) and a causal LM checkpoint, with a freshly "
                                   "initialized projector: the starting point of stage 1. `<image>` gets id "
                                   "vocab_size and the embeddings grow by one (mean) row unless "
                                   "--image-token-index names an existing id.")
    p.add_argument("--clip", type=Path, required=True, help="CLIP checkpoint folder")
    p.add_argument("--llm", type=Path, required=True, help="LLaMA-family causal LM checkpoint folder")
    p.add_argument("out_dir", type=Path, help="output folder (llava_jax format)")
    p.add_argument("--projector", default="mlp2x_gelu",
                   help="linear | mlp<N>x_gelu | identity (default: mlp2x_gelu, LLaVA-1.5)")
    p.add_argument("--vision-feature-layer", type=int, nargs="+", default=[-2],
                   help="CLIP hidden state(s) used as image features (default: -2); several are concatenated")
    p.add_argument("--vision-feature-select-strategy", choices=("default", "full"), default="default",
                   help="default drops the CLS token, full keeps it")
    p.add_argument("--image-token-index", type=int, default=None,
                   help="id of <image> (default: the LLM's vocab_size, i.e. a new token)")
    p.add_argument("--pad-vocab-to-multiple-of", type=int, default=None,
                   help="round the grown vocabulary up to a multiple of this")
    p.add_argument("--seed", type=int, default=0, help="projector initialization seed")
    _add_dtype_args(p)


def _import_original_args(sub) -> None:
    p = sub.add_parser("import-original", help="official LLaVA checkpoint (model.mm_projector.*) -> llava_jax",
                       description="Import an original LLaVA checkpoint (LlavaLlamaForCausalLM, e.g. "
                                   "liuhaotian/llava-v1.5-7b). The vision tower is read from the checkpoint "
                                   "when saved there, else from --clip (its mm_vision_tower). Like "
                                   "transformers' conversion, <image> gets id vocab_size and the vocabulary is "
                                   "padded to a multiple of 64.")
    p.add_argument("llava_dir", type=Path, help="original LLaVA checkpoint folder")
    p.add_argument("out_dir", type=Path, help="output folder (llava_jax format)")
    p.add_argument("--clip", type=Path, default=None, help="CLIP checkpoint folder (mm_vision_tower)")
    p.add_argument("--pad-vocab-to-multiple-of", type=int, default=64, help="default: 64")
    _add_dtype_args(p)


def _export_args(sub) -> None:
    p = sub.add_parser("export", help="llava_jax format -> Hugging Face folder",
                       description="Export to a folder that transformers loads with from_pretrained "
                                   "(config.json, safetensors shards + index in the classic layout, "
                                   "preprocessor_config.json; with --tokenizer also the tokenizer with <image> "
                                   "added and processor_config.json for AutoProcessor).")
    p.add_argument("our_dir", type=Path, help="llava_jax checkpoint folder (model.json + params/), a Hugging Face "
                   "folder, or a finished training workdir (its export_hf folder, as chat and serve take it)")
    p.add_argument("hf_dir", type=Path, help="output folder")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer folder (e.g. the LLM's); <image> is added when absent")
    p.add_argument("--image-processor", type=Path, default=None,
                   help="image processor folder (default: CLIP's, at the tower's resolution)")
    p.add_argument("--chat-template", type=Path, default=None, help="Jinja chat template file to store")
    p.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB (default: 5GB)")
    p.add_argument("--param-dtype", choices=tuple(DTYPES), default=None, help="cast the exported weights")


def _quantize_args(sub) -> None:
    p = sub.add_parser("quantize", help="model folder -> weight-only int8 / int4 folder (llava_jax format)",
                       description="Quantize the language model's Linear weights and output head (int8: one "
                                   "scale per output channel; int4: one per group of inputs); the tokenizer "
                                   "and preprocessor files are copied. load_model, chat, eval, serve and bench "
                                   "read the result like any model folder.")
    p.add_argument("--model", type=Path, required=True, help="Hugging Face or llava_jax model folder")
    p.add_argument("--out", type=Path, required=True, help="output folder (llava_jax format)")
    p.add_argument("--bits", type=int, choices=(8, 4), required=True)
    p.add_argument("--group-size", type=int, default=128, help="int4 group length along the inputs (default 128)")
    p.add_argument("--include-vision", action="store_true", help="also the vision tower and the projector")
    _add_dtype_args(p)


def _dtypes(args) -> dict:
    return {"dtype": args.dtype, "param_dtype": args.param_dtype}


@cli.command(OSError, ValueError, TypeError, KeyError)  # CheckpointError is a ValueError.
def main(argv: list[str] | None = None) -> int:
    return _run(_parser().parse_args(argv))


def _run(args) -> int:
    import llava_jax.convert as convert
    from llava_jax.models.quant import dequantize_model

    start = time.time()
    if args.command == "import-llava":
        model = convert.from_hf(args.hf_dir, **_dtypes(args))
    elif args.command == "import-clip-llm":
        layer = args.vision_feature_layer[0] if len(args.vision_feature_layer) == 1 else args.vision_feature_layer
        model = convert.from_clip_and_llm(args.clip, args.llm, projector=args.projector, vision_feature_layer=layer,
                                          vision_feature_select_strategy=args.vision_feature_select_strategy,
                                          image_token_index=args.image_token_index,
                                          pad_vocab_to_multiple_of=args.pad_vocab_to_multiple_of, seed=args.seed,
                                          **_dtypes(args))
    elif args.command == "quantize":
        from llava_jax.convert.quantize import param_bytes, quantize_folder
        from llava_jax.models.quant import QuantConfig

        out = quantize_folder(args.model, args.out, QuantConfig(args.bits, args.group_size, args.include_vision),
                              **_dtypes(args))
        print(f"quantized {args.model} to {out} (int{args.bits}, params {param_bytes(out) / 2**20:.1f} MiB) "
              f"in {time.time() - start:.1f}s")
        return 0
    elif args.command == "import-original":
        model = convert.from_original_llava(args.llava_dir, clip_path=args.clip,
                                            pad_vocab_to_multiple_of=args.pad_vocab_to_multiple_of,
                                            **_dtypes(args))
    else:
        model = dequantize_model(convert.load_folder(convert.resolve_workdir(args.our_dir)[0],
                                                     param_dtype=args.param_dtype))  # no-op for floats
        chat_template = args.chat_template.read_text() if args.chat_template else None
        out = convert.to_hf(model, args.hf_dir, tokenizer=args.tokenizer, image_processor=args.image_processor,
                            max_shard_size=args.max_shard_size, chat_template=chat_template)
        print(f"exported {type(model).__name__} to {out} in {time.time() - start:.1f}s")
        return 0
    out = convert.save(model, args.out_dir)
    print(f"imported {type(model).__name__} to {out} in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
