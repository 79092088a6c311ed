"""captum attributions of one detection (``analysis.attribution``), checked against hand computations."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from analysis.attribution import (
    Attribution,
    attribute,
    explained_detection,
    gradcam_layers,
    plot_attribution,
    plot_attributions,
)
from sdetr import Detector, build_model


@pytest.fixture(scope="module")
def tiny() -> Detector:
    torch.manual_seed(0)
    return build_model("sdetr-tiny").eval()


@pytest.fixture
def image() -> Tensor:
    """``[3, 64, 96]`` normalised-looking noise."""
    return torch.randn(3, 64, 96, generator=torch.Generator().manual_seed(1))


def score(model: Detector, images: Tensor, query: int, class_id: int, mask: Tensor | None = None) -> Tensor:
    """The explained scalar written out by hand: ``softmax(pred_logits)[:, query, class_id]``."""
    return model(images, mask)["pred_logits"].softmax(-1)[:, query, class_id]


def test_default_detection_is_the_highest_scoring_one(tiny: Detector, image: Tensor) -> None:
    with torch.no_grad():
        probs = tiny(image[None])["pred_logits"].softmax(-1)[0]  # [Q, C + 1]
    real = probs[:, :-1]
    flat = int(real.argmax())
    query, class_id = divmod(flat, real.shape[1])
    assert explained_detection(tiny, image) == (query, class_id, pytest.approx(float(real[query, class_id])))
    # an explicit target keeps the query's choice and takes the given class
    assert explained_detection(tiny, image, query=3, target=7)[:2] == (3, 7)
    assert explained_detection(tiny, image, query=3, target=7)[2] == pytest.approx(float(probs[3, 7]))
    # a target alone picks the query that gives it the highest probability
    assert explained_detection(tiny, image, target=7)[:2] == (int(probs[:, 7].argmax()), 7)


def test_integrated_gradients_is_complete() -> None:
    """Completeness: the attributions add up to ``f(image) - f(baseline)`` within 5 %.

    The model is ``sdetr-tiny`` with a frozen-BN ResNet-18 backbone, so the path from the zero (mean
    image) baseline is not a no-op (see the GroupNorm test below). A random-weight model is
    nearly scale-invariant after its normalisation layers: its score moves over a short stretch
    of the path near the baseline, which a 16-point quadrature resolves only for a low-contrast
    image (unit-variance noise at 64x96 measured up to 43 % off at 16-64 steps, on two of three
    seeds); 0.003 x noise keeps the path smooth (at 48x64, 16 steps: 0.1-1.1 % off on three seeds).
    """
    torch.manual_seed(0)
    model = build_model("sdetr-tiny", backbone="resnet18", backbone_norm="frozen_bn").eval()  # as measured
    image = 0.003 * torch.randn(3, 48, 64, generator=torch.Generator().manual_seed(10))
    result = attribute(model, image, method="integrated_gradients", n_steps=16, internal_batch_size=16)
    with torch.no_grad():
        both = score(model, torch.stack([image, torch.zeros_like(image)]), result.query, result.class_id)
    difference = float(both[0] - both[1])
    assert abs(difference) > 1e-3  # the path does change the score: the check below is not vacuous
    total = float(result.map.sum())
    assert abs(total - difference) <= 0.05 * abs(difference)
    assert result.delta == pytest.approx(total - difference, abs=1e-5)
    assert result.map.shape == (48, 64)


def test_zero_baseline_on_a_group_norm_backbone_warns_and_why(tiny: Detector, image: Tensor) -> None:
    """GroupNorm after the bias-free conv1 makes the score blind to the input's scale: f(a x) = f(x)."""
    query, class_id, _ = explained_detection(tiny, image)
    with torch.no_grad():
        scaled = score(tiny, torch.stack([image, 0.5 * image, 0.1 * image]), query, class_id)
    torch.testing.assert_close(scaled, scaled[:1].expand(3), rtol=2e-3, atol=0)
    with pytest.warns(UserWarning, match="GroupNorm"):
        attribute(tiny, image, method="integrated_gradients", n_steps=1)


def test_saliency_is_the_gradient_of_the_explained_score(tiny: Detector, image: Tensor) -> None:
    result = attribute(tiny, image, method="saliency")
    x = image.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(score(tiny, x[None], result.query, result.class_id)[0], x)  # [3, H, W]
    torch.testing.assert_close(result.map, grad.abs().sum(0), rtol=1e-5, atol=1e-10)
    signed = attribute(tiny, image, method="saliency", abs=False)
    torch.testing.assert_close(signed.map, grad.sum(0), rtol=1e-5, atol=1e-10)
    assert float(grad.abs().sum()) > 0
    assert all(p.grad is None for p in tiny.parameters())  # captum differentiates the input only


def test_occlusion_windows_are_stride_cells_with_the_score_drop(tiny: Detector) -> None:
    image = torch.randn(3, 64, 64, generator=torch.Generator().manual_seed(6))
    result = attribute(tiny, image, method="occlusion", window=16)
    query, class_id = result.query, result.class_id
    cells = result.map.reshape(4, 16, 4, 16).permute(0, 2, 1, 3).reshape(4, 4, 256)  # [rows, cols, pixels]
    assert torch.equal(cells, cells[..., :1].expand_as(cells))  # one value per 16x16 cell
    occluded = image.clone()
    occluded[:, 16:32, 32:48] = 0  # cell (1, 2) at the baseline (the mean image)
    with torch.no_grad():
        drop = score(tiny, torch.stack([image, occluded]), query, class_id)
    # captum scores several occlusions per forward, this a batch of two: float32 rounding of the
    # scores differs by ~1e-8 with the batch size, so the drop (~5e-4 here) agrees to ~1e-7
    assert float(cells[1, 2, 0]) == pytest.approx(float(drop[0] - drop[1]), rel=1e-4, abs=2e-7)
    coarse = attribute(tiny, image, method="occlusion", window=32)
    blocks = coarse.map.reshape(2, 32, 2, 32).permute(0, 2, 1, 3).reshape(2, 2, 1024)
    assert torch.equal(blocks, blocks[..., :1].expand_as(blocks))
    assert coarse.window == 32


def test_occlusion_of_padding_the_model_never_sees_is_zero(tiny: Detector) -> None:
    """A 32x48 image placed in a 48x64 padded canvas (pad mask True outside it), as in a batch.

    Padding is the constant 0 with a pad mask: attention ignores padded cells, and the model's
    input there is always the padding value, so occluding a stride-aligned window of padding
    changes nothing and scores exactly 0 (one occlusion per forward, so that every forward has
    the clean one's batch size: batching changes float rounding by ~1e-8). What the model does
    *not* ignore is other content in the padded pixels: the ResNet's receptive field reaches
    across the image border (checked below), which is why ``DetectionScore`` sets padded pixels
    to 0 whatever a method puts there. Windows are stride-16 cells, so none straddles the
    border; a misaligned window overlapping the image would carry a non-zero drop into the padding.
    """
    image = torch.randn(3, 32, 48, generator=torch.Generator().manual_seed(4))
    result = attribute(tiny, image, method="occlusion", window=16, pad_to=(48, 64), perturbations_per_eval=1)
    assert result.map.shape == (48, 64)
    assert torch.equal(result.map[32:], torch.zeros(16, 64))
    assert torch.equal(result.map[:, 48:], torch.zeros(48, 16))
    valid = result.map[:32, :48].reshape(2, 16, 3, 16)[:, 0, :, 0]  # one value per cell
    assert bool((valid != 0).all())
    # the receptive field: real content in the padded pixels would move the score ...
    canvas = torch.zeros(1, 3, 48, 64)
    canvas[0, :, :32, :48] = image
    mask = torch.ones(1, 48, 64, dtype=torch.bool)
    mask[0, :32, :48] = False
    noisy = canvas.clone()
    noisy[0, :, 32:] = torch.randn(3, 16, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        clean, seen = score(tiny, torch.cat([canvas, noisy]), result.query, result.class_id, mask.expand(2, -1, -1))
    assert abs(float(clean - seen)) > 1e-6
    # ... so attributions treat padding as the padding value 0: the padded canvas scores as the plain image
    assert float(clean) == pytest.approx(result.score, rel=1e-5)


def test_layer_gradcam_matches_a_hand_written_grad_cam(tiny: Detector, image: Tensor) -> None:
    assert gradcam_layers(tiny) == ["stage1.input_proj", "stage2.input_proj"]
    result = attribute(tiny, image, method="layer_gradcam", layer="stage2.input_proj")
    kept: list[Tensor] = []
    handle = tiny.stages[1].input_proj.register_forward_hook(lambda _m, _i, out: kept.append(out))
    try:
        y = score(tiny, image[None], result.query, result.class_id)[0]
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(y, kept[0])  # [1, 64, 4, 6]
    cam = (grad.mean(dim=(2, 3), keepdim=True) * kept[0]).sum(1).clamp(min=0)[0].detach()  # [4, 6]
    # cell-aligned upsampling: each 16x16 cell's corner pixels equal the cell at the image corners
    assert result.map.shape == (64, 96)
    assert float(result.map[0, 0]) == pytest.approx(float(cam[0, 0]), rel=1e-4, abs=1e-12)
    assert float(result.map[63, 95]) == pytest.approx(float(cam[3, 5]), rel=1e-4, abs=1e-12)
    assert float(result.map.max()) <= float(cam.max()) * (1 + 1e-5)
    assert result.layer == "stage2.input_proj"
    backbone = attribute(tiny, image, method="layer_gradcam", layer="backbone.body.layer2")  # stride 8
    assert backbone.map.shape == (64, 96)


def test_bad_arguments_name_the_fix(tiny: Detector, image: Tensor) -> None:
    with pytest.raises(ValueError, match="method="):
        attribute(tiny, image, method="lime")
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        attribute(tiny, image[None], method="saliency")
    with pytest.raises(ValueError, match="query=20"):
        attribute(tiny, image, query=20, method="saliency")
    with pytest.raises(ValueError, match="layer="):
        attribute(tiny, image, method="layer_gradcam", layer="stage9.input_proj")
    with pytest.raises(ValueError, match="pad_to"):
        attribute(tiny, image, method="saliency", pad_to=(32, 32))


def test_plots_draw_each_map_over_the_image(image: Tensor) -> None:
    rgb = torch.rand(3, 64, 96, generator=torch.Generator().manual_seed(3))
    first = Attribution(torch.linspace(-1, 1, 64 * 96).reshape(64, 96), "saliency", 1, 2, 0.5)
    second = Attribution(torch.rand(64, 96), "occlusion", 1, 2, 0.5, window=16)
    figure = plot_attribution(rgb, first)
    drawn = figure.axes[1].images[-1].get_array()
    assert torch.equal(torch.as_tensor(drawn), first.map)
    assert figure.axes[1].images[-1].get_clim() == (-1.0, 1.0)  # signed: centred colour scale
    several = plot_attributions(rgb, [first, second])
    image_axes = [ax for ax in several.axes if ax.images]
    assert len(image_axes) == 3  # the image, then one overlay per attribution
    assert torch.equal(torch.as_tensor(image_axes[2].images[-1].get_array()), second.map)
