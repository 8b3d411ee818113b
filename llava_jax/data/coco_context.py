"""The symbolic context of a COCO image, as the GPT-assisted data generation of LLaVA shows it to a text-only LLM.

An image is seen only through its captions and its object boxes: one caption per line, then (for the
families that use boxes) a blank line and one `category: [x1, y1, x2, y2]` line per box, the corners
normalized by the image size and rounded to 3 decimals, in annotation order. This is the layout of the
`NNN_caps.txt` few-shot files of the official `playground/data/prompts`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import defaultdict
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class ImageContext:
    """One COCO image: its id, file name, captions and (category name, normalized box) pairs."""

    image_id: int
    file_name: str
    captions: tuple[str, ...]
    boxes: tuple[tuple[str, tuple[float, float, float, float]], ...] = ()

    def text(self, with_boxes: bool = True) -> str:
        """Captions, then (when `with_boxes` and there are boxes) a blank line and the box lines."""
        lines = "\n".join(self.captions)
        if with_boxes and self.boxes:
            lines += "\n\n" + "\n".join(f"{name}: {list(box)}" for name, box in self.boxes)
        return lines


def normalized_box(bbox, width: int, height: int) -> tuple[float, float, float, float]:
    """COCO `[x, y, w, h]` in pixels -> `(x1, y1, x2, y2)` in [0, 1], rounded to 3 decimals."""
    x, y, w, h = (float(v) for v in bbox)
    corners = (x / width, y / height, (x + w) / width, (y + h) / height)
    return tuple(round(min(max(v, 0.0), 1.0), 3) for v in corners)


def _load(path: str | os.PathLike, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed JSON ({e.msg} at line {e.lineno})") from None
    for key in ("images", "annotations") + (("categories",) if what == "instances" else ()):
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            raise ValueError(f"{path}: not a COCO {what} file (needs a {key!r} list)")
    return data


def load_coco(captions_path: str | os.PathLike, instances_path: str | os.PathLike | None = None
              ) -> list[ImageContext]:
    """The contexts of every captioned image of `captions_*.json` (with the boxes of `instances_*.json`),
    sorted by image id. Images without a caption are left out; errors name the file and the annotation."""
    captions_data = _load(captions_path, "captions")
    images = {}
    for index, image in enumerate(captions_data["images"]):
        if not all(k in image for k in ("id", "file_name", "width", "height")):
            raise ValueError(f"{captions_path}: image #{index + 1} needs id, file_name, width and height")
        images[image["id"]] = image
    captions = defaultdict(list)
    for index, ann in enumerate(captions_data["annotations"]):
        if ann.get("image_id") not in images or not isinstance(ann.get("caption"), str):
            raise ValueError(f"{captions_path}: caption annotation #{index + 1} needs a known image_id and a "
                             "string caption")
        captions[ann["image_id"]].append(ann["caption"].strip())
    boxes = _boxes(instances_path, images) if instances_path else defaultdict(list)
    return [ImageContext(image_id, images[image_id]["file_name"], tuple(captions[image_id]),
                         tuple(boxes[image_id])) for image_id in sorted(captions)]


def _boxes(instances_path, images: dict) -> dict[int, list]:
    data = _load(instances_path, "instances")
    names = {c["id"]: c["name"] for c in data["categories"]}
    boxes = defaultdict(list)
    for index, ann in enumerate(data["annotations"]):
        image = images.get(ann.get("image_id"))
        if image is None:
            continue  # an image without captions: not generated
        bbox = ann.get("bbox")
        if ann.get("category_id") not in names or not (isinstance(bbox, list) and len(bbox) == 4):
            raise ValueError(f"{instances_path}: annotation #{index + 1} needs a known category_id and a "
                             "[x, y, w, h] bbox")
        boxes[image["id"]].append((names[ann["category_id"]], normalized_box(bbox, image["width"], image["height"])))
    return boxes


def file_stem(file_name: str) -> str:
    """The sample id of an image: its file name without folder and extension (as LLaVA-Instruct ids)."""
    return Path(file_name).stem
