"""Input attributions of one detection with captum: integrated gradients, saliency, occlusion, Grad-CAM.

The scalar explained is the final prediction's class probability of one detection,
``softmax(pred_logits)[0, query, class]``. The query and the class are fixed from the clean
forward (:func:`explained_detection`: by default the highest-scoring detection), so they
cannot switch along an integration path or between occlusions.

``f(x [B, 3, H, W]) -> [B]`` (:class:`DetectionScore`) wraps the model for captum, which
evaluates it on batches (the steps of integrated gradients, several occlusions at once).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from captum.attr import IntegratedGradients, LayerAttribution, LayerGradCam, Occlusion, Saliency
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor, nn

from analysis.evaluation import eval_mode
from sdetr import Detector

METHODS = ("integrated_gradients", "saliency", "occlusion", "layer_gradcam")


@dataclass
class Attribution:
    """What :func:`attribute` found for one detection.

    Attributes:
        map: ``[H, W]`` over the input pixels (the padded canvas when ``pad_to`` was given).
            Integrated gradients and saliency: summed over the 3 channels. Occlusion: each
            pixel carries its window's drop of the score, ``f(x) - f(x with the window at the
            baseline)`` (all 3 channels are occluded together, so one channel is kept).
            Grad-CAM: the layer's map upsampled to the pixels.
        method: one of :data:`METHODS`.
        query / class_id / score: the explained detection and its probability on the clean input.
        delta: integrated gradients only: convergence delta, ``sum(map) - (f(x) - f(baseline))``.
        window: occlusion only: side of the square window and of its step, in pixels.
        layer: Grad-CAM only: the dotted name of the layer.
    """

    map: Tensor
    method: str
    query: int
    class_id: int
    score: float
    delta: float | None = None
    window: int | None = None
    layer: str | None = None


def check_image(image: Tensor) -> Tensor:
    """One ``[3, H, W]`` float, normalised image (clear error otherwise)."""
    if not isinstance(image, Tensor) or image.dim() != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, Tensor) else type(image).__name__
        raise ValueError(
            f"image must be one [3, H, W] ImageNet-normalised tensor (sdetr.normalize_image), got {shape}; "
            "explain one image at a time"
        )
    if not image.is_floating_point():
        raise TypeError(f"image has dtype {image.dtype}; convert to float and normalise with sdetr.normalize_image")
    return image


def place_on_canvas(image: Tensor, pad_to: tuple[int, int] | None) -> tuple[Tensor, Tensor]:
    """The image at the top left of a zero canvas, as the model sees it inside a padded batch.

    Args:
        image: ``[3, h, w]``.
        pad_to: ``(H, W)`` of the canvas (>= the image), or None for no padding.
    Returns:
        ``canvas [3, H, W]`` and ``mask [H, W]`` (True = padded).
    """
    height, width = int(image.shape[1]), int(image.shape[2])
    if pad_to is None:
        return image, torch.zeros(height, width, dtype=torch.bool, device=image.device)
    canvas_h, canvas_w = (int(v) for v in pad_to)
    if canvas_h < height or canvas_w < width:
        raise ValueError(f"pad_to={tuple(pad_to)} is smaller than the {height}x{width} image; give (H >= h, W >= w)")
    canvas = image.new_zeros(3, canvas_h, canvas_w)
    canvas[:, :height, :width] = image
    mask = torch.ones(canvas_h, canvas_w, dtype=torch.bool, device=image.device)
    mask[:height, :width] = False
    return canvas, mask


class DetectionScore(nn.Module):
    """``f(x [B, 3, H, W]) -> [B]``: ``softmax(pred_logits)[:, query, class_id]``.

    With a pad ``mask``, padded pixels are set to the padding value 0 before the model runs
    (whatever an attribution method puts there) and the mask goes to the model: ``f`` then
    depends on the image's own pixels only, as for an image padded into a batch.

    Args:
        model: the detector.
        query / class_id: the explained output.
        mask: ``[H, W]`` pad mask (True = padded) of the canvas, or None.
    """

    def __init__(self, model: Detector, query: int, class_id: int, mask: Tensor | None = None) -> None:
        super().__init__()
        self.model = model
        self.query = query
        self.class_id = class_id
        self.mask = mask

    def forward(self, images: Tensor) -> Tensor:
        """``images [B, 3, H, W]`` -> ``[B]``."""
        mask = None
        if self.mask is not None and bool(self.mask.any()):
            mask = self.mask[None].expand(images.shape[0], -1, -1)  # [B, H, W]
            images = images * (~mask)[:, None].to(images.dtype)  # padded pixels -> 0
        logits = self.model(images, mask)["pred_logits"]  # [B, Q, C + 1]
        return logits.softmax(-1)[:, self.query, self.class_id]


def explained_detection(
    model: Detector, image: Tensor, query: int | None = None, target: int | None = None, mask: Tensor | None = None
) -> tuple[int, int, float]:
    """The ``(query, class_id, score)`` to explain, from one clean forward (no gradients).

    Default query: the highest-scoring detection, the argmax over queries of the largest
    probability of a real class (the "no object" logit left out); default class: that
    detection's class. ``target`` fixes the class (``num_classes`` is "no object"); with a
    target and no query, the query is the one giving that class the highest probability.

    Args:
        image: ``[3, H, W]`` normalised (the canvas when padded); mask: its ``[H, W]`` pad mask.
    """
    with torch.no_grad():
        logits = model(image[None], None if mask is None else mask[None])["pred_logits"][0]  # [Q, C + 1]
    probs = logits.softmax(-1)
    num_queries, num_logits = probs.shape
    if target is not None and not 0 <= target < num_logits:
        raise ValueError(
            f"target={target} is out of range: classes are 0..{num_logits - 2}, and {num_logits - 1} is 'no object'"
        )
    if query is None:
        best = probs[:, :-1].max(-1).values if target is None else probs[:, target]  # [Q]
        query = int(best.argmax())
    if not 0 <= query < num_queries:
        raise ValueError(f"query={query} is out of range: the model has {num_queries} queries (0..{num_queries - 1})")
    if target is None:
        target = int(probs[query, :-1].argmax())
    return query, target, float(probs[query, target])


def gradcam_layers(model: Detector) -> list[str]:
    """The default Grad-CAM layers: every stage's ``input_proj`` (``stage1.input_proj``, ...)."""
    return [f"stage{index}.input_proj" for index in range(1, len(model.stages) + 1)]


def _grid_size(height: int, width: int, stride: int) -> tuple[int, int]:
    """Grid of a ResNet level of ``stride``: every stride-2 step maps n -> ceil(n / 2)."""
    for _ in range(stride.bit_length() - 1):
        height, width = (height + 1) // 2, (width + 1) // 2
    return height, width


def upsample_grid(grid: Tensor, size: tuple[int, int], stride: int | None = None) -> Tensor:
    """A ``[h, w]`` map over stride-``stride`` cells -> ``[H, W]`` over pixels (bilinear).

    Cell ``(r, c)`` covers pixels ``[r s, (r + 1) s)``: the grid is upsampled to ``h s x w s``
    and cropped to ``size``, so every cell lands on its own pixels. Without a stride that fits
    ``size`` the grid is stretched over the image.
    """
    height, width = size
    h, w = int(grid.shape[-2]), int(grid.shape[-1])
    if stride is None or _grid_size(height, width, stride) != (h, w):
        candidates = [2**k for k in range(12) if _grid_size(height, width, 2**k) == (h, w)]
        stride = candidates[0] if candidates else None
    target = (h * stride, w * stride) if stride is not None else (height, width)
    up = LayerAttribution.interpolate(grid.reshape(1, 1, h, w).float(), target, interpolate_mode="bilinear")
    return up[0, 0, :height, :width]  # [H, W]


def _resolve_layer(model: Detector, layer: str) -> tuple[nn.Module, int | None]:
    try:
        module = model.get_submodule(layer)
    except AttributeError as error:
        raise ValueError(
            f"layer={layer!r} is not a submodule of the model; use e.g. {gradcam_layers(model)} or a backbone "
            "layer such as 'backbone.body.layer3'"
        ) from error
    stride = None
    for index, stage in enumerate(model.stages, start=1):
        if layer == f"stage{index}.input_proj":
            stride = stage.stride
    return module, stride


def attribute(
    model: Detector,
    image: Tensor,
    query: int | None = None,
    target: int | None = None,
    method: str = "integrated_gradients",
    *,
    n_steps: int = 64,
    internal_batch_size: int | None = 16,
    baseline: Tensor | None = None,
    abs: bool = True,
    window: int = 16,
    perturbations_per_eval: int = 8,
    layer: str | None = None,
    relu: bool = True,
    pad_to: tuple[int, int] | None = None,
) -> Attribution:
    """Attribute one detection's class probability to the input pixels with captum.

    Args:
        model: the detector (run in eval mode here; its mode is restored afterwards).
        image: one ``[3, H, W]`` ImageNet-normalised image.
        query / target: the explained query and class; default the highest-scoring detection
            and its class; a target alone picks the query scoring it highest
            (:func:`explained_detection`).
        method: ``"integrated_gradients"`` (captum ``IntegratedGradients``), ``"saliency"``
            (``Saliency``), ``"occlusion"`` (``Occlusion``) or ``"layer_gradcam"`` (``LayerGradCam``).
        n_steps / internal_batch_size: integrated gradients: quadrature steps (Gauss-Legendre,
            captum's default) and how many of them one forward takes.
        baseline: integrated gradients: ``[3, H, W]`` start of the path; default zeros, i.e. the
            ImageNet-mean image in normalised space. A GroupNorm backbone after a bias-free
            ``conv1`` (``sdetr-tiny``) is blind to the scale of its input, so along the path from
            zero the score only changes right next to the baseline, where no quadrature looks:
            the attributions then do not add up (a warning says so). Another baseline (e.g. a
            blurred copy of the image) avoids that path; check ``delta`` either way.
        abs: saliency: absolute gradients (captum's default) before the channel sum.
        window: occlusion: side of the square window and of its step, in pixels, aligned with
            the feature grids (16: one stride-16 cell per window; 32: one stride-32 cell).
            Occluded pixels take the baseline 0 (the mean image).
        perturbations_per_eval: occlusion: occluded copies per forward.
        layer: Grad-CAM: dotted submodule name; default the last stage's ``input_proj``
            (:func:`gradcam_layers` lists every stage's), or a backbone layer such as
            ``"backbone.body.layer3"``. The map is upsampled with ``LayerAttribution.interpolate``.
        relu: Grad-CAM: keep only the positive part (as Grad-CAM does).
        pad_to: ``(H, W)`` of a canvas to place the image on (top left, zero padding with a pad
            mask), as the model sees it inside a padded batch; the map then covers the canvas.
    Returns:
        an :class:`Attribution` with ``map [H, W]``.
    """
    if method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; choose one of {METHODS}")
    image = check_image(image)
    device = next(model.parameters()).device
    canvas, mask = place_on_canvas(image.detach().to(device), pad_to)  # [3, H, W], [H, W]
    height, width = int(canvas.shape[1]), int(canvas.shape[2])
    with eval_mode(model):
        query, class_id, score = explained_detection(model, canvas, query, target, mask if pad_to else None)
        forward = DetectionScore(model, query, class_id, mask if pad_to else None)
        inputs = canvas[None].clone().requires_grad_(method != "occlusion")  # [1, 3, H, W]
        result = Attribution(torch.empty(0), method, query, class_id, score)
        if method == "integrated_gradients":
            result.map, result.delta = _integrated_gradients(
                model, forward, inputs, baseline, n_steps, internal_batch_size, pad_to
            )
        elif method == "saliency":
            grads = Saliency(forward).attribute(inputs, abs=abs)  # [1, 3, H, W]
            result.map = grads[0].sum(0).detach()
        elif method == "occlusion":
            if window < 1 or window > min(height, width):
                raise ValueError(
                    f"window={window} must be between 1 and the image's shorter side ({min(height, width)})"
                )
            with torch.no_grad():
                scores = Occlusion(forward).attribute(
                    inputs,
                    sliding_window_shapes=(3, window, window),
                    strides=(3, window, window),
                    baselines=0.0,
                    perturbations_per_eval=perturbations_per_eval,
                )  # [1, 3, H, W], the same value in all channels of a window
            result.map, result.window = scores[0, 0].detach(), window
        else:
            name = layer or gradcam_layers(model)[-1]
            module, stride = _resolve_layer(model, name)
            cam = LayerGradCam(forward, module).attribute(inputs, relu_attributions=relu)  # [1, 1, h, w]
            result.map = upsample_grid(cam[0, 0].detach(), (height, width), stride)
            result.layer = name
    return result


def _integrated_gradients(
    model: Detector,
    forward: DetectionScore,
    inputs: Tensor,
    baseline: Tensor | None,
    n_steps: int,
    internal_batch_size: int | None,
    pad_to: tuple[int, int] | None,
) -> tuple[Tensor, float]:
    """Integrated gradients of ``inputs [1, 3, H, W]``: channel-summed ``[H, W]`` map and delta."""
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    if baseline is None:
        if getattr(model.config, "backbone_norm", None) == "group_norm":
            warnings.warn(
                "integrated gradients from the zero (mean-image) baseline on a GroupNorm backbone: the score does not "
                "change with the input's scale, so along the path it only moves right next to the baseline, where the "
                "quadrature does not look, and the attributions do not add up to f(x) - f(0) (see delta); pass another "
                "baseline, e.g. a blurred copy of the image",
                stacklevel=3,
            )
        start = torch.zeros_like(inputs)  # the ImageNet-mean image, normalised
    else:
        start, _ = place_on_canvas(check_image(baseline).to(inputs.device), pad_to)
        if start.shape != inputs.shape[1:]:
            raise ValueError(f"baseline has shape {tuple(baseline.shape)}; it must be shaped like the image")
        start = start[None]
    attributions, delta = IntegratedGradients(forward).attribute(
        inputs,
        baselines=start,
        n_steps=n_steps,
        internal_batch_size=internal_batch_size,
        return_convergence_delta=True,
    )  # [1, 3, H, W], [1]
    return attributions[0].sum(0).detach(), float(delta[0])


# ---------------------------------------------------------------------------------------- plots


def _rgb(image_rgb: Tensor) -> Tensor:
    if image_rgb.dim() != 3 or image_rgb.shape[0] != 3:
        raise ValueError(f"image_rgb must be [3, H, W] RGB in [0, 1], got {tuple(image_rgb.shape)}")
    return image_rgb.detach().float().cpu().clamp(0, 1).permute(1, 2, 0)  # [H, W, 3]


def overlay(ax: Axes, image_rgb: Tensor, values: Tensor, title: str) -> None:
    """Draw ``values [H, W]`` over ``image_rgb [3, h, w]`` (cropped or padded to the map's size).

    Signed maps use a diverging colour map centred at 0; non-negative maps ``magma``.
    """
    values = values.detach().float().cpu()
    rgb = _rgb(image_rgb)
    height, width = values.shape
    shown = torch.zeros(height, width, 3)
    h, w = min(height, rgb.shape[0]), min(width, rgb.shape[1])
    shown[:h, :w] = rgb[:h, :w]
    ax.imshow(shown.numpy())
    low, high = float(values.min()), float(values.max())
    if low < 0:
        bound = max(-low, high) or 1.0
        im = ax.imshow(values.numpy(), cmap="coolwarm", vmin=-bound, vmax=bound, alpha=0.6)
    else:
        im = ax.imshow(values.numpy(), cmap="magma", vmin=0.0, vmax=high or 1.0, alpha=0.6)
    ax.figure.colorbar(im, ax=ax, shrink=0.8)  # type: ignore[union-attr]
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])


def _title(attribution: Attribution) -> str:
    detail = {
        "integrated_gradients": f"delta {attribution.delta:.2g}" if attribution.delta is not None else "",
        "occlusion": f"window {attribution.window}",
        "layer_gradcam": attribution.layer or "",
    }.get(attribution.method, "")
    return f"{attribution.method}\nquery {attribution.query}, class {attribution.class_id} {detail}".rstrip()


def plot_attribution(image_rgb: Tensor, attribution: Attribution) -> Figure:
    """The image and the attribution drawn over it.

    Args:
        image_rgb: ``[3, H, W]`` RGB in [0, 1] (not normalised).
        attribution: from :func:`attribute`.
    """
    figure = Figure(figsize=(9, 3.8), layout="constrained")
    axes = figure.subplots(1, 2)
    axes[0].imshow(_rgb(image_rgb).numpy())
    axes[0].set_title(f"image (score {attribution.score:.3f})")
    axes[0].set_xticks([])
    axes[0].set_yticks([])
    overlay(axes[1], image_rgb, attribution.map, _title(attribution))
    return figure


def plot_attributions(image_rgb: Tensor, attributions: Sequence[Attribution]) -> Figure:
    """The image, then each attribution over it, side by side.

    Args:
        image_rgb: ``[3, H, W]`` RGB in [0, 1].
        attributions: from :func:`attribute` (any methods).
    """
    if not attributions:
        raise ValueError("attributions is empty; pass at least one Attribution")
    figure = Figure(figsize=(4.2 * (len(attributions) + 1), 3.8), layout="constrained")
    axes = figure.subplots(1, len(attributions) + 1, squeeze=False)[0]
    axes[0].imshow(_rgb(image_rgb).numpy())
    axes[0].set_title("image")
    axes[0].set_xticks([])
    axes[0].set_yticks([])
    for ax, attribution in zip(axes[1:], attributions, strict=True):
        overlay(ax, image_rgb, attribution.map, _title(attribution))
    return figure


__all__ = [
    "METHODS",
    "Attribution",
    "DetectionScore",
    "attribute",
    "explained_detection",
    "gradcam_layers",
    "plot_attribution",
    "plot_attributions",
    "upsample_grid",
]
