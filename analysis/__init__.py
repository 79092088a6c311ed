"""Analyses of sdetr recordings and detections (QKVA grids, head statistics, small objects)."""

from analysis.qkva import plot_qkva, principal_component

__all__ = ["plot_qkva", "principal_component"]
