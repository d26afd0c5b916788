"""Loss values on inputs whose answer can be worked out by hand."""
import pytest
import torch

from LightFusionLib.losses import (PAPER_ABLATION, PAPER_EQ5, FusionLoss, LossWeights, gradient_loss,
                                   intensity_loss, sobel_magnitude, ssim, ssim_loss)


def const(v, size=16):
    return torch.full((1, 1, size, size), float(v))


def step(size=16, column=8):
    x = torch.zeros(1, 1, size, size)
    x[..., column:] = 1.0
    return x


def test_intensity_loss_is_l1_to_elementwise_max():
    assert float(intensity_loss(const(0), const(0.2), const(0.6))) == pytest.approx(0.6)
    assert float(intensity_loss(const(0.6), const(0.2), const(0.6))) == pytest.approx(0.0)
    a = torch.tensor([[[[0.0, 1.0]]]])
    b = torch.tensor([[[[1.0, 0.0]]]])
    assert float(intensity_loss(const(0.5, 1).expand(1, 1, 1, 2), a, b)) == pytest.approx(0.5)


def test_sobel_magnitude_of_a_unit_step():
    g = sobel_magnitude(step())
    # The step sits between columns 7 and 8: Sobel gives (1+2+1) * 1 = 4 on both, 0 elsewhere.
    assert torch.allclose(g[..., 7], torch.full((1, 1, 16), 4.0), atol=1e-3)
    assert torch.allclose(g[..., 8], torch.full((1, 1, 16), 4.0), atol=1e-3)
    assert float(g[..., :7].abs().max()) < 1e-3 and float(g[..., 9:].abs().max()) < 1e-3


def test_gradient_loss_by_hand():
    # Flat output against a step: two columns of magnitude 4 over a 16x16 image -> 4 * 2 / 16.
    assert float(gradient_loss(const(0.3), step(), const(0.0))) == pytest.approx(0.5, rel=1e-3)
    assert float(gradient_loss(step(), step(), const(0.0))) == pytest.approx(0.0, abs=1e-4)
    assert float(gradient_loss(const(0.1), const(0.4), const(0.9))) == pytest.approx(0.0, abs=1e-6)


def test_ssim_identity_and_loss():
    torch.manual_seed(0)
    x = torch.rand(2, 1, 32, 32)
    assert float(ssim(x, x)) == pytest.approx(1.0, abs=1e-5)
    assert float(ssim_loss(x, x, x)) == pytest.approx(0.0, abs=1e-5)
    # Constant images: SSIM reduces to the luminance term (2*mu_x*mu_y + C1) / (mu_x^2 + mu_y^2 + C1).
    c1 = 0.01**2
    expected = (2 * 0.2 * 0.6 + c1) / (0.2**2 + 0.6**2 + c1)
    assert float(ssim(const(0.2, 32), const(0.6, 32))) == pytest.approx(expected, rel=1e-4)


def test_total_is_the_weighted_sum():
    torch.manual_seed(1)
    f, a, b = (torch.rand(1, 1, 24, 24) for _ in range(3))
    w = LossWeights(intensity=2.0, gradient=3.0, ssim=5.0)
    total, parts = FusionLoss(w)(f, a, b)
    expected = 2 * parts["intensity"] + 3 * parts["gradient"] + 5 * parts["ssim"]
    assert float(total) == pytest.approx(float(expected), rel=1e-6)


def test_paper_presets():
    assert (PAPER_EQ5.intensity, PAPER_EQ5.gradient, PAPER_EQ5.ssim) == (20, 100, 50)
    assert (PAPER_ABLATION.intensity, PAPER_ABLATION.gradient, PAPER_ABLATION.ssim) == (100, 50, 20)
