"""Boxes stay on their objects under flip, resize and crop."""

from __future__ import annotations

import random

import pytest
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from sdetr.data.transforms import SCALES, RandomSizeCrop, ToModelTarget, build_transforms
from sdetr.model.boxes import cxcywh_to_xyxy


def _scene(boxes: list[list[int]], height: int = 120, width: int = 160):  # type: ignore[no-untyped-def]
    """An image whose only bright pixels are the given boxes (each a different channel value)."""
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        image[i % 3, y0:y1, x0:x1] = 255
    target = {
        "boxes": tv_tensors.BoundingBoxes(
            torch.tensor(boxes, dtype=torch.float32), format="XYXY", canvas_size=(height, width)
        ),
        "labels": torch.arange(1, len(boxes) + 1),
    }
    return tv_tensors.Image(image), target


def _content_box(image: torch.Tensor, channel: int) -> torch.Tensor:
    ys, xs = torch.nonzero(image[channel] > 127, as_tuple=True)
    return torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)


@pytest.mark.parametrize("seed", range(12))
def test_boxes_follow_content_through_train_augmentation(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    image, target = _scene([[10, 20, 60, 70], [90, 30, 150, 100]])
    transform = v2.Compose(
        [t for t in build_transforms("synthetic", train=True).transforms if not isinstance(t, ToModelTarget)]
    )
    out_image, out_target = transform(image, target)
    for box, label in zip(out_target["boxes"], out_target["labels"], strict=True):
        expected = _content_box(out_image, int(label) - 1)
        torch.testing.assert_close(box, expected, atol=2.5, rtol=0)


def test_flip_mirrors_boxes() -> None:
    image, target = _scene([[10, 20, 60, 70]])
    out_image, out_target = v2.RandomHorizontalFlip(p=1.0)(image, target)
    assert out_target["boxes"].tolist() == [[100.0, 20.0, 150.0, 70.0]]
    assert torch.equal(_content_box(out_image, 0), torch.tensor([100.0, 20.0, 150.0, 70.0]))


def test_crop_drops_boxes_outside_and_keeps_sizes_in_range() -> None:
    random.seed(0)
    image, target = _scene([[0, 0, 20, 20], [120, 90, 160, 120]])
    crop = RandomSizeCrop(50, 80)
    for _ in range(20):
        out_image, out_target = v2.Compose([crop, v2.SanitizeBoundingBoxes()])(image, target)
        h, w = out_image.shape[-2:]
        assert 50 <= h <= 80 and 50 <= w <= 80
        boxes = out_target["boxes"]
        assert len(boxes) == len(out_target["labels"])
        assert torch.all(boxes[:, 2] <= w) and torch.all(boxes[:, 3] <= h) and torch.all(boxes[:, :2] >= 0)


def test_validation_resize_and_model_target() -> None:
    image, target = _scene([[10, 20, 60, 70]], height=96, width=128)
    pixels, out = build_transforms("synthetic", train=False)(image, target)
    assert pixels.shape == (3, 160, 213) and pixels.dtype == torch.float32  # short side -> 160
    assert out["size"].tolist() == [160, 213]
    absolute = cxcywh_to_xyxy(out["boxes"]) * torch.tensor([213, 160, 213, 160])
    expected = torch.tensor([[10.0, 20, 60, 70]]) * torch.tensor([213 / 128, 160 / 96, 213 / 128, 160 / 96])
    torch.testing.assert_close(absolute, expected, atol=1e-3, rtol=0)
    assert SCALES["full"].val_size == 800 and SCALES["full"].max_size == 1333
    assert SCALES["full"].train_sizes == tuple(range(480, 801, 32))


def test_scaled_scale_multiplies_every_size_and_rounds() -> None:
    """Progressive resizing's smaller epochs: the synthetic scale at 0.8, worked out by hand."""
    small = SCALES["synthetic"].scaled(0.8)
    # train sizes 128..192 step 16 -> 102.4, 115.2, 128, 140.8, 153.6; max 256 -> 204.8; crop 112 -> 89.6
    assert small.train_sizes == (102, 115, 128, 141, 154)
    assert (small.max_size, small.crop_resize, small.crop_range) == (205, (102, 115, 128), (90, 128))
    assert small.val_size == 128
    assert SCALES["synthetic"].scaled(1.0) == SCALES["synthetic"]
    image, target = _scene([[10, 20, 60, 70]], height=96, width=128)
    pixels, out = build_transforms(small, train=True, augment=False)(image, target)
    assert pixels.shape == (3, 128, 170) and out["size"].tolist() == [128, 170]  # 128 * 4 / 3 = 170.7, truncated
    for bad in (0.0, -0.5, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="positive and finite"):
            SCALES["synthetic"].scaled(bad)
