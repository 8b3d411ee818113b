"""Throughput of image decoding + CLIP preprocessing on generated 640x480 JPEGs.

    python -m llava_jax.data.bench_images [--workers 1 2] [--num 200] [--aspect pad] [--compare-hf]

Measures decode + pad + bicubic resize + center crop + normalize, in this process and with N worker
processes (workers return only their CPU time, so the numbers exclude moving pixel arrays between
processes). Two rates: images per wall-clock second, and images per CPU second of the processes doing
the work (the per-core rate, meaningful on a machine shared with other jobs).
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import time

import numpy as np
from PIL import Image

from llava_jax import cli
from llava_jax.data.images import ImageConfig, load_image, preprocess

_JPEGS: list[bytes] = []
_CONFIG = ImageConfig()


def make_jpegs(num: int, width: int = 640, height: int = 480, seed: int = 0) -> list[bytes]:
    """`num` photo-like JPEGs (smooth gradients plus noise), quality 90."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    jpegs = []
    for _ in range(num):
        phase = rng.uniform(0, 2 * np.pi, 3)
        base = 127 + 100 * np.sin(x[..., None] / 57 + y[..., None] / 43 + phase)
        pixels = np.clip(base + rng.normal(0, 20, (height, width, 3)), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    return jpegs


def process(index: int) -> float:
    """Decodes and preprocesses JPEG `index`; returns the CPU seconds it took."""
    start = time.process_time()
    preprocess(load_image(_JPEGS[index % len(_JPEGS)]), _CONFIG)
    return time.process_time() - start


def hf_images_per_cpu_second(num: int) -> float:
    """The official path for comparison: PIL decode, expand2square, transformers' PIL CLIPImageProcessor."""
    from transformers import CLIPImageProcessorPil

    from llava_jax.data.images import expand_to_square
    processor = CLIPImageProcessorPil(size={"shortest_edge": _CONFIG.size},
                                      crop_size={"height": _CONFIG.crop_size, "width": _CONFIG.crop_size})
    cpu = 0.0
    for index in range(num + 1):
        start = time.process_time()
        image = Image.open(io.BytesIO(_JPEGS[index % len(_JPEGS)])).convert("RGB")
        if _CONFIG.aspect == "pad":
            image = expand_to_square(image, _CONFIG.background)
        processor(image, return_tensors="np")
        cpu += (time.process_time() - start) if index else 0.0  # the first call warms up
    return num / cpu


def _init_worker(jpegs: list[bytes], cfg: ImageConfig):
    global _JPEGS, _CONFIG
    _JPEGS, _CONFIG = jpegs, cfg


def images_per_second(num: int, workers: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second) over `num` images with `workers` processes
    (0: this process)."""
    if workers == 0:
        process(0)  # warm up
        start = time.perf_counter()
        cpu = sum(process(index) for index in range(num))
        return num / (time.perf_counter() - start), num / cpu
    with multiprocessing.get_context("fork").Pool(workers, _init_worker, (_JPEGS, _CONFIG)) as pool:
        pool.map(process, range(workers), chunksize=1)  # warm up every worker
        start = time.perf_counter()
        cpu = sum(pool.map(process, range(num), chunksize=8))
        return num / (time.perf_counter() - start), num / cpu


@cli.command()
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker process counts")
    parser.add_argument("--num", type=int, default=200, help="images per measurement")
    parser.add_argument("--aspect", choices=["pad", "resize"], default="pad")
    parser.add_argument("--compare-hf", action="store_true", help="also time transformers' PIL processor")
    args = parser.parse_args(argv)
    global _JPEGS, _CONFIG
    _JPEGS, _CONFIG = make_jpegs(min(args.num, 50)), ImageConfig(aspect=args.aspect)
    print(f"640x480 JPEG -> decode + {args.aspect} + bicubic {_CONFIG.size} + crop + normalize, {args.num} images")
    rate, per_cpu = images_per_second(args.num, 0)
    print(f"single process: {rate:7.1f} images/s wall, {per_cpu:7.1f} images per CPU second")
    if args.compare_hf:
        print(f"transformers:                          {hf_images_per_cpu_second(args.num):7.1f} images per CPU "
              "second (PIL decode + expand2square + CLIPImageProcessorPil)")
    for workers in args.workers:
        rate, per_cpu = images_per_second(args.num, workers)
        print(f"{workers:2d} workers:     {rate:7.1f} images/s wall total, {rate / workers:7.1f} per worker, "
              f"{per_cpu:7.1f} images per CPU second per worker")


if __name__ == "__main__":
    main()
