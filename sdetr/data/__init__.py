"""Data: synthetic images (the COCO pipeline and the embedded dataset come with the trainer)."""

from sdetr.data.synthetic import synthetic_image

__all__ = ["synthetic_image"]
