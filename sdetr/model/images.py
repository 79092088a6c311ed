"""Input batches: validation, padding of differently sized images and the pad mask."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

#: ImageNet statistics the backbone expects (inputs are normalised with them).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize_image(image: Tensor) -> Tensor:
    """``[..., 3, H, W]`` RGB in [0, 1] -> ImageNet-normalised (what the models take)."""
    mean = image.new_tensor(IMAGENET_MEAN)[:, None, None]
    std = image.new_tensor(IMAGENET_STD)[:, None, None]
    return (image - mean) / std


@dataclass(frozen=True)
class ImageBatch:
    """A padded batch.

    Attributes:
        tensors: ``[B, 3, H, W]`` float images, padded with zeros at the bottom and right.
        mask: ``[B, H, W]`` bool, True on padded pixels.
    """

    tensors: Tensor
    mask: Tensor

    @property
    def valid_sizes(self) -> Tensor:
        """``[B, 2]`` (height, width) of each image's unpadded region."""
        return valid_extent(self.mask)

    @classmethod
    def from_input(cls, images: Tensor | Sequence[Tensor], mask: Tensor | None = None) -> ImageBatch:
        """Validate model input and pad it.

        Args:
            images: ``[B, 3, H, W]`` tensor, or a sequence of ``[3, H_i, W_i]`` tensors.
            mask: optional ``[B, H, W]`` bool pad mask for a tensor input (True = padded).
        """
        if isinstance(images, Tensor):
            if images.dim() != 4:
                hint = " (a single image? add a batch dimension with images[None])" if images.dim() == 3 else ""
                raise ValueError(
                    f"images must be a [B, 3, H, W] tensor or a list of [3, H, W] tensors; "
                    f"got a tensor of shape {tuple(images.shape)}{hint}"
                )
            if images.shape[0] == 0:
                raise ValueError("images is an empty batch (B = 0); pass at least one image")
            _check_image(images[0], "images[0]")
            _check_finite(images)
            if mask is None:
                mask = torch.zeros(images.shape[0], *images.shape[-2:], dtype=torch.bool, device=images.device)
            elif mask.shape != (images.shape[0], *images.shape[-2:]) or mask.dtype != torch.bool:
                raise ValueError(
                    f"mask must be a bool tensor of shape {(images.shape[0], *images.shape[-2:])} "
                    f"(True = padded pixel); got {mask.dtype} {tuple(mask.shape)}"
                )
            return cls(images, mask)
        if mask is not None:
            raise ValueError("mask is only accepted with a batched tensor; a list of images is padded for you")
        images = list(images)
        if not images:
            raise ValueError("images is an empty list; pass at least one [3, H, W] image")
        for index, image in enumerate(images):
            if not isinstance(image, Tensor):
                raise TypeError(f"images[{index}] is a {type(image).__name__}, expected a [3, H, W] tensor")
            if image.dim() != 3:
                raise ValueError(f"images[{index}] has shape {tuple(image.shape)}; expected [3, H, W]")
            _check_image(image, f"images[{index}]")
            _check_finite(image[None], index)
        height = max(image.shape[1] for image in images)
        width = max(image.shape[2] for image in images)
        first = images[0]
        tensors = first.new_zeros(len(images), 3, height, width)
        padded = torch.ones(len(images), height, width, dtype=torch.bool, device=first.device)
        for index, image in enumerate(images):
            tensors[index, :, : image.shape[1], : image.shape[2]] = image
            padded[index, : image.shape[1], : image.shape[2]] = False
        return cls(tensors, padded)


def valid_extent(mask: Tensor) -> Tensor:
    """``[B, H, W]`` pad mask (True = padded) -> ``[B, 2]`` rows and columns not padded."""
    not_mask = ~mask
    return torch.stack((not_mask.any(dim=2).sum(dim=1), not_mask.any(dim=1).sum(dim=1)), dim=1)


def _check_finite(images: Tensor, first_index: int = 0) -> None:
    """``images [B, 3, H, W]``: every pixel finite (one NaN or inf spreads to every prediction of its image)."""
    finite = torch.isfinite(images).flatten(1).all(dim=1)  # [B]
    if bool(finite.all()):
        return
    bad = [first_index + int(i) for i in torch.nonzero(~finite).flatten()]
    count = int((~torch.isfinite(images[bad[0] - first_index])).sum())
    others = f" (and images {bad[1:]})" if len(bad) > 1 else ""
    raise ValueError(
        f"images[{bad[0]}] has {count} non-finite pixel value(s) (NaN or inf){others}; "
        "the model would predict NaN for it. Check the image file or the preprocessing"
    )


def _check_image(image: Tensor, name: str) -> None:
    """``image [3, H, W]``: three channels, floating point, non-empty (any float dtype: the model converts)."""
    if image.shape[0] != 3:
        raise ValueError(f"{name} has {image.shape[0]} channels; the backbone expects 3 (RGB) in [3, H, W]")
    if not image.is_floating_point():
        raise TypeError(f"{name} has dtype {image.dtype}; convert to float and normalise with sdetr.normalize_image")
    if image.shape[1] < 32 or image.shape[2] < 32:
        raise ValueError(f"{name} is {image.shape[1]}x{image.shape[2]} pixels; the backbone needs at least 32x32")
