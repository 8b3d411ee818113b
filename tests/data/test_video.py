"""Video samples: uniform frame sampling, files decoded with PyAV, folders of frames, bounded and refused cleanly."""

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llava_jax.data import video
from llava_jax.data.errors import BadSample

av = pytest.importorskip("av")


def encode_video(frames: np.ndarray, codec: str = "mpeg4") -> bytes:
    """uint8 [T, H, W, 3] -> an mp4 file's bytes."""
    out = io.BytesIO()
    with av.open(out, "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=10)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")))
        container.mux(stream.encode())
    return out.getvalue()


def numbered_frames(count: int, height: int = 32, width: int = 48) -> np.ndarray:
    """Frame i is a flat grey of level 10 * i, so a decoded frame tells which one it was."""
    return np.stack([np.full((height, width, 3), 10 * i, np.uint8) for i in range(count)])


def frame_numbers(frames: np.ndarray) -> list[int]:
    return [int(round(f.mean() / 10)) for f in frames]


def test_sampling_spreads_over_the_whole_video_and_keeps_short_ones_whole():
    assert video.sample_frame_indices(20, 8).tolist() == np.linspace(0, 19, 8, dtype=int).tolist()
    assert video.sample_frame_indices(20, 8)[[0, -1]].tolist() == [0, 19]
    assert video.sample_frame_indices(5, 8).tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="num_frames"):
        video.sample_frame_indices(5, 0)


def test_a_video_file_decodes_to_its_sampled_frames_in_order():
    data = encode_video(numbered_frames(20))
    frames = video.decode_video(data, num_frames=8, name="clip.mp4")
    assert frames.shape == (8, 32, 48, 3) and frames.dtype == np.uint8
    assert frame_numbers(frames) == video.sample_frame_indices(20, 8).tolist()
    short = video.decode_video(encode_video(numbered_frames(3)), num_frames=8, name="short.mp4")
    assert frame_numbers(short) == [0, 1, 2]


def test_bad_videos_are_refused_naming_the_file():
    with pytest.raises(BadSample, match=r"cannot decode video broken\.mp4.*\[corrupt_video\]"):
        video.decode_video(b"not a video at all" * 10, num_frames=4, name="broken.mp4", sample_id="s1")
    data = encode_video(numbered_frames(4))
    with pytest.raises(BadSample, match=r"big\.mp4 frames are 48x32, over the limit of 1000 pixels"):
        video.decode_video(data, num_frames=4, name="big.mp4", max_pixels=1000)
    with pytest.raises(BadSample, match="corrupt_video"):
        video.decode_video(data[: len(data) // 3], num_frames=4, name="cut.mp4")


def test_a_folder_of_frames_reads_only_its_sampled_frames(tmp_path: Path):
    folder = tmp_path / "v1"
    folder.mkdir()
    for i, array in enumerate(numbered_frames(12)):
        Image.fromarray(array).save(folder / f"frame_{i:03d}.png")
    (folder / "notes.txt").write_text("not a frame")
    names = [p.name for p in folder.iterdir()]
    encoded = video.read_frame_folder(folder, names, num_frames=4, sample_id="s2")
    frames = video.decode_frames(encoded, name=str(folder))
    assert frame_numbers(frames) == video.sample_frame_indices(12, 4).tolist() == [0, 3, 7, 11]
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "frame_999.png")
    with pytest.raises(BadSample, match="frames of different sizes"):
        video.decode_frames(video.read_frame_folder(folder, [p.name for p in folder.iterdir()], num_frames=20),
                            name="v1")
    with pytest.raises(BadSample, match="has no frame images"):
        video.read_frame_folder(tmp_path, ["a.txt"], num_frames=4)
