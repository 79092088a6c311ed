"""The embedded synthetic dataset, in COCO's layout, generated deterministically from a seed.

Scenes are textured backgrounds with several classes of flat shapes that may occlude each
other; object sizes are drawn log-uniformly so that COCO's small (< 32^2 px), medium and large
(> 96^2 px) ranges are all present. Annotations are the *visible* part of each object (box and
area, as COCO's), and objects hidden below 30 % are left out.

The set is written to a cache folder (``$SDETR_CACHE`` or ``~/.cache/sdetr``) on first use,
under a name that encodes its spec, and reused afterwards. ``python -m sdetr.data``
generates one with chosen options (see ``sdetr/data/__main__.py``).
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor
from tqdm import tqdm

from sdetr.data.annotations import BadDataError, read_annotation_json
from sdetr.typed_fields import ConfigError, check_fields

CLASSES = ("rectangle", "ellipse", "triangle", "cross")
#: Centre of each class's hue band (red, green, blue, yellow-orange) when ``class_hues`` is on.
CLASS_HUES = (0.0, 0.33, 0.62, 0.13)
HUE_SPREAD = 0.05
FORMAT_VERSION = 1
#: Smallest image side (the backbone needs 32 x 32 pixels).
MIN_SIDE = 32


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate. Changing any field gives another cache folder.

    ``class_hues``: a shape's fill colour comes from its class's hue band (saturated, bright),
    so class is visible in colour as well as in outline. A from-scratch model learns colour in
    a few hundred steps but outline shape far more slowly; with ``class_hues=False`` (any
    colour) the CPU quickstart does not learn the classes within its minutes.
    """

    height: int = 192
    width: int = 256
    num_train: int = 1200
    num_val: int = 200
    max_objects: int = 4
    min_side: int = 10
    seed: int = 0
    class_hues: bool = True  # each class filled from its own hue band; False: any colour

    def __post_init__(self) -> None:
        check_fields(self)
        for name in ("num_train", "num_val", "max_objects", "min_side"):
            if getattr(self, name) < 1:
                raise ConfigError(f"SyntheticSpec {name}={getattr(self, name)}: use a positive integer")
        if min(self.height, self.width) < MIN_SIDE:
            raise ConfigError(
                f"SyntheticSpec height={self.height}, width={self.width}: images need at least {MIN_SIDE} pixels "
                "per side (the backbone's smallest input)"
            )
        if self.min_side > 0.75 * min(self.height, self.width):
            raise ConfigError(
                f"SyntheticSpec min_side={self.min_side}: objects cannot be larger than 3/4 of the image's "
                f"shorter side ({0.75 * min(self.height, self.width):g} pixels)"
            )
        if self.seed < 0:
            raise ConfigError(f"SyntheticSpec seed={self.seed}: use 0 or more")

    def key(self) -> str:
        payload = json.dumps({"format": FORMAT_VERSION, **asdict(self)}, sort_keys=True)
        return (
            f"synthetic-{self.height}x{self.width}-{self.num_train}-{self.num_val}-s{self.seed}-"
            + hashlib.sha1(payload.encode()).hexdigest()[:8]
        )


def default_cache_dir() -> Path:
    return Path(os.environ.get("SDETR_CACHE", Path.home() / ".cache" / "sdetr"))


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """``[H, W, 3]`` uint8: a colour gradient with stripes and noise."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = rng.uniform(40, 200, size=3)
    slope = rng.uniform(-0.3, 0.3, size=(2, 3))
    image = base + yy[..., None] * slope[0] + xx[..., None] * slope[1]
    angle, period = rng.uniform(0, math.pi), rng.uniform(6, 24)
    stripes = np.sin((xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period)
    image += stripes[..., None] * rng.uniform(5, 25)
    image += rng.normal(0, 8, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def fill_colour(rng: np.random.Generator, kind: int, class_hues: bool) -> tuple[int, int, int]:
    """RGB fill of a shape of class index ``kind``: from its hue band, or uniformly random."""
    if not class_hues:
        red, green, blue = (int(c) for c in rng.integers(0, 256, size=3))
        return red, green, blue
    hue = (CLASS_HUES[kind] + rng.uniform(-HUE_SPREAD, HUE_SPREAD)) % 1.0
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.7, 1.0), rng.uniform(0.7, 1.0))
    red, green, blue = (int(c * 255) for c in rgb)
    return red, green, blue


def _draw_shape(
    draw: ImageDraw.ImageDraw, kind: str, box: tuple[float, float, float, float], fill: int | tuple[int, ...]
) -> None:
    x0, y0, x1, y1 = box
    if kind == "rectangle":
        draw.rectangle(box, fill=fill)
    elif kind == "ellipse":
        draw.ellipse(box, fill=fill)
    elif kind == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # cross
        tw, th = (x1 - x0) / 3, (y1 - y0) / 3
        draw.rectangle((x0 + tw, y0, x1 - tw, y1), fill=fill)
        draw.rectangle((x0, y0 + th, x1, y1 - th), fill=fill)


def render_scene(rng: np.random.Generator, spec: SyntheticSpec) -> tuple[Image.Image, list[dict]]:
    """One image and its visible-object annotations (bbox xywh, area, category_id 1..K)."""
    height, width = spec.height, spec.width
    image = Image.fromarray(_background(rng, height, width))
    ids = Image.new("I", (width, height), 0)  # instance id of each pixel (0 = background)
    draw, draw_ids = ImageDraw.Draw(image), ImageDraw.Draw(ids)
    count = int(rng.integers(1, spec.max_objects + 1))
    objects: list[tuple[int, float]] = []  # (category id, full area when unoccluded)
    max_side = 0.75 * min(height, width)
    for instance in range(1, count + 1):
        kind = int(rng.integers(len(CLASSES)))
        side = math.exp(rng.uniform(math.log(spec.min_side), math.log(max_side)))
        aspect = math.exp(rng.uniform(-0.5, 0.5))
        w, h = min(side * aspect, width - 1), min(side / aspect, height - 1)
        x0, y0 = rng.uniform(0, width - w), rng.uniform(0, height - h)
        box = (x0, y0, x0 + w, y0 + h)
        colour = fill_colour(rng, kind, spec.class_hues)
        _draw_shape(draw, CLASSES[kind], box, colour)
        _draw_shape(draw_ids, CLASSES[kind], box, instance)
        alone = Image.new("L", (width, height), 0)
        _draw_shape(ImageDraw.Draw(alone), CLASSES[kind], box, 255)
        objects.append((kind + 1, float(np.count_nonzero(np.asarray(alone)))))
    id_map = np.asarray(ids)
    annotations = []
    for instance, (category, full_area) in enumerate(objects, start=1):
        ys, xs = np.nonzero(id_map == instance)
        visible = len(ys)
        if visible < 12 or visible < 0.3 * full_area:  # (almost) hidden by later shapes
            continue
        x_min, x_max, y_min, y_max = int(xs.min()), int(xs.max()) + 1, int(ys.min()), int(ys.max()) + 1
        annotations.append(
            {
                "bbox": [x_min, y_min, x_max - x_min, y_max - y_min],
                "area": float(visible),
                "category_id": category,
                "iscrowd": 0,
            }
        )
    return image, annotations


#: PNG writes in flight while the next scenes render (bounds the images held in memory).
WRITES_IN_FLIGHT = 4


def _write_split(root: Path, split: str, count: int, spec: SyntheticSpec, seed: int) -> None:
    rng = np.random.default_rng(seed)
    folder = root / f"{split}2017"
    folder.mkdir(parents=True)
    images: list[dict] = []
    annotations: list[dict] = []
    # PIL encodes PNGs without the GIL: one thread writes while the next scene renders (the same
    # files, about a third less time on 2 cores). A failed write is raised here.
    with ThreadPoolExecutor(max_workers=1) as writer:
        writes: deque[Future[None]] = deque()
        for index in tqdm(range(count), desc=f"synthetic {split}", leave=False):
            image, objects = render_scene(rng, spec)
            name = f"{index:06d}.png"
            writes.append(writer.submit(image.save, folder / name))
            if len(writes) > WRITES_IN_FLIGHT:
                writes.popleft().result()
            image_id = index + 1
            images.append({"id": image_id, "file_name": name, "height": spec.height, "width": spec.width})
            for obj in objects:
                annotations.append({"id": len(annotations) + 1, "image_id": image_id, **obj})
        for write in writes:
            write.result()
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)]
    payload = {"images": images, "annotations": annotations, "categories": categories, "info": {"spec": asdict(spec)}}
    (root / "annotations").mkdir(exist_ok=True)
    (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(payload))


def synthetic_root(spec: SyntheticSpec, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder where the set for ``spec`` lives (or will live) in the cache."""
    return (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / spec.key()


def generate_synthetic_coco(spec: SyntheticSpec | None = None, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder of the synthetic set for ``spec``, generating it on first use.

    The folder is built under a temporary name and renamed into place, so an interrupted
    generation never leaves a half-written set behind.
    """
    spec = spec or SyntheticSpec()
    root = synthetic_root(spec, cache_dir)
    cache = root.parent
    if root.exists():
        _check_cached(root, spec)
        return root
    cache.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{spec.key()}.", dir=cache))
    try:
        _write_split(building, "train", spec.num_train, spec, spec.seed)
        _write_split(building, "val", spec.num_val, spec, spec.seed + 1_000_003)
        try:
            building.rename(root)
        except OSError:  # another process finished the same set first
            if not (root / "annotations" / "instances_val2017.json").is_file():
                raise
    finally:
        if building.exists():
            shutil.rmtree(building, ignore_errors=True)
    return root


def _check_cached(root: Path, spec: SyntheticSpec) -> None:
    """A cached set is complete and was made from ``spec`` (else a clear error: delete the folder)."""
    for split in ("train", "val"):
        annotations = root / "annotations" / f"instances_{split}2017.json"
        try:
            stored = read_annotation_json(annotations).get("info", {}).get("spec")
        except (FileNotFoundError, BadDataError, AttributeError) as error:
            raise BadDataError(
                f"the cached synthetic set {root} is incomplete or damaged ({annotations}: {error}); "
                "delete that folder and it is generated again"
            ) from None
        if stored != asdict(spec):
            raise BadDataError(
                f"the cached synthetic set {root} was not made from this spec ({annotations} records {stored!r}); "
                "delete that folder and it is generated again"
            )


def synthetic_image(height: int, width: int, seed: int = 0, shapes: int = 4) -> Tensor:
    """``[3, H, W]`` RGB in [0, 1]: one synthetic scene, drawn in memory."""
    spec = SyntheticSpec(height=height, width=width, max_objects=shapes, min_side=min(16, height // 4))
    image, _ = render_scene(np.random.default_rng(seed), spec)
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255
