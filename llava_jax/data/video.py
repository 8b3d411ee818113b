"""Video samples (the LLaVA-NeXT data format's `"video"` key): frames sampled uniformly, decoded to RGB.

A video is either a file (mp4, webm, mkv, avi, mov, ...: decoded with PyAV, `pip install av`, the `video`
extra) or a folder of frame images (sorted by name, as the LLaVA-NeXT training code lists them). Either way
`num_frames` frames are kept, uniformly spread over the whole video (the LLaVA-NeXT recipe's `frames_upbound`
with `force_sample`: `np.linspace(0, total - 1, num_frames, dtype=int)`); a video with fewer frames keeps all.

Memory stays bounded: a file is read through the one bounded reader (`DEFAULT_MAX_VIDEO_BYTES`), frames are
checked against the pixel limit from the stream header before any decoding, only the sampled frames are
converted to arrays, and a folder reads only its sampled frame files.
"""

from __future__ import annotations

import io
from typing import Sequence

import numpy as np

from llava_jax.data.errors import BadSample
from llava_jax.data.images import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_PIXELS, load_image, read_image_bytes

DEFAULT_MAX_VIDEO_BYTES = 1 << 30
FRAME_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def sample_frame_indices(total: int, num_frames: int) -> np.ndarray:
    """int64 [min(total, num_frames)]: `num_frames` indices spread uniformly over `total` frames, first and last
    included (all frames when there are no more than `num_frames`)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    if total <= num_frames:
        return np.arange(total, dtype=np.int64)
    return np.linspace(0, total - 1, num_frames, dtype=int).astype(np.int64)


def decode_video(data: bytes, *, num_frames: int, name: str, sample_id: str | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """A video file's bytes -> uint8 [T, H, W, 3] RGB, T = min(frames, num_frames) sampled uniformly.

    Raises BadSample "corrupt_video" (not a video, no video stream, no frame decodes), "image_too_large" (a frame
    over `max_pixels`, from the stream header) or "missing_dependency" (PyAV is not installed)."""
    try:
        import av
    except ImportError as e:
        raise BadSample("missing_dependency", f"video {name}: decoding video files needs PyAV "
                        "(pip install 'llava_jax[video]'), or give the video as a folder of frames", sample_id) from e
    try:
        total = _count_frames(av, data, name, sample_id, max_pixels)
        if total == 0:
            raise BadSample("corrupt_video", f"video {name} has no frame", sample_id)
        keep = sample_frame_indices(total, num_frames)
        wanted, kept = set(keep.tolist()), []
        with av.open(io.BytesIO(data)) as container:
            for index, frame in enumerate(container.decode(_video_stream(container, name, sample_id))):
                if index in wanted:  # only the sampled frames become arrays
                    kept.append(frame.to_ndarray(format="rgb24"))
                if index >= keep[-1]:
                    break
    except BadSample:
        raise
    except (av.FFmpegError, OSError, ValueError, EOFError, IndexError) as e:
        raise BadSample("corrupt_video", f"cannot decode video {name}: {e}", sample_id) from e
    if not kept:
        raise BadSample("corrupt_video", f"video {name} has no decodable frame", sample_id)
    return np.stack(kept)


def _count_frames(av, data: bytes, name: str, sample_id: str | None, max_pixels: int) -> int:
    """The number of frames (the stream header's count, else its packets, read without decoding), after checking
    the frame size from the header."""
    with av.open(io.BytesIO(data)) as container:
        stream = _video_stream(container, name, sample_id)
        if stream.width * stream.height > max_pixels:
            raise BadSample("image_too_large", f"video {name} frames are {stream.width}x{stream.height}, over "
                            f"the limit of {max_pixels} pixels", sample_id)
        return stream.frames or sum(1 for packet in container.demux(stream) if packet.size)


def _video_stream(container, name: str, sample_id: str | None):
    if not container.streams.video:
        raise BadSample("corrupt_video", f"{name} has no video stream", sample_id)
    return container.streams.video[0]


def frame_files(names: Sequence[str]) -> list[str]:
    """The frame images of a folder listing, sorted by name (other files are ignored)."""
    return sorted(n for n in names if n.lower().endswith(FRAME_SUFFIXES))


def decode_frames(frames: Sequence[bytes], *, name: str, sample_id: str | None = None,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Encoded frame images (already sampled) -> uint8 [T, H, W, 3] RGB. Frames of different sizes are refused
    (BadSample "corrupt_video"); image errors are those of `load_image`."""
    if not frames:
        raise BadSample("corrupt_video", f"video {name} has no frame images", sample_id)
    arrays = [np.asarray(load_image(f, sample_id=sample_id, name=f"frame {i} of {name}", max_pixels=max_pixels))
              for i, f in enumerate(frames)]
    sizes = {a.shape for a in arrays}
    if len(sizes) > 1:
        raise BadSample("corrupt_video", f"video {name}: frames of different sizes {sorted(sizes)}", sample_id)
    return np.stack(arrays)


def read_frame_folder(folder, names: Sequence[str], *, num_frames: int, sample_id: str | None = None,
                      max_bytes: int = DEFAULT_MAX_IMAGE_BYTES) -> list[bytes]:
    """The encoded bytes of the `num_frames` frames sampled from a folder (`folder / name` for each of `names`,
    its listing), each read by the bounded reader."""
    files = frame_files(names)
    if not files:
        raise BadSample("corrupt_video", f"video folder {folder} has no frame images {FRAME_SUFFIXES}", sample_id)
    return [read_image_bytes(folder / files[i], max_bytes=max_bytes, name=f"{files[i]!r} in {folder}",
                             sample_id=sample_id) for i in sample_frame_indices(len(files), num_frames)]
