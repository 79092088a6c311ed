"""Issue 11: model inputs with NaN/inf pixels are refused with the image index; any float dtype works."""

from __future__ import annotations

import pytest
import torch

from sdetr import Detector, build_model


@pytest.fixture(scope="module")
def tiny() -> Detector:
    torch.manual_seed(0)
    return build_model("sdetr-tiny", num_classes=4).eval()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_pixel_is_refused_with_the_image_index(tiny: Detector, bad: float) -> None:
    """Issue 11: one NaN pixel gave NaN scores and boxes for its image, with no error."""
    images = torch.zeros(3, 3, 64, 96)
    images[1, 2, 10, 20] = bad
    images[1, 0, 0, 0] = bad
    with pytest.raises(ValueError, match=r"images\[1\] has 2 non-finite pixel value\(s\) \(NaN or inf\);"):
        tiny(images)
    listed = [torch.zeros(3, 64, 96), torch.zeros(3, 48, 64)]
    listed[1][0, 5, 5] = bad
    with pytest.raises(ValueError, match=r"images\[1\] has 1 non-finite"):
        tiny(listed)
    images[2, 0, 0, 0] = bad
    with pytest.raises(ValueError, match=r"images\[1\] has 2 .*\(and images \[2\]\)"):
        tiny(images)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_float_dtypes_are_converted_to_the_models(tiny: Detector, dtype: torch.dtype) -> None:
    """Issue 11: float16/float64 images gave a dtype RuntimeError."""
    images = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    converted = images.to(dtype)
    with torch.no_grad():
        expected = tiny(converted.float())
        out = tiny(converted)
        listed = tiny(list(converted))
    assert out["pred_boxes"].dtype == torch.float32
    torch.testing.assert_close(out["pred_boxes"], expected["pred_boxes"], rtol=0, atol=0)
    torch.testing.assert_close(listed["pred_logits"], expected["pred_logits"], rtol=0, atol=0)
