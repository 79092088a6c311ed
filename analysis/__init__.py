"""Analyses of sdetr recordings and detections (QKVA grids, head statistics, small objects)."""

__all__: list[str] = []
