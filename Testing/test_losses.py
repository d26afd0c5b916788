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


# ------------------------------------------------------------------------------------------------
# the study's loss variants


def test_signed_gradient_term_keeps_the_edge_direction_the_magnitude_term_ignores():
    edge, flat = step(), const(0.5)
    inverted = 1.0 - edge  # same |gradient| everywhere, opposite sign
    assert float(gradient_loss(inverted, edge, flat, "sobel")) == pytest.approx(0.0, abs=1e-6)
    assert float(gradient_loss(edge, edge, flat, "signed")) == pytest.approx(0.0, abs=1e-6)
    # the Sobel kernel gives 4 per unit step on two columns of 16: |(-4) - 4| * 2/16 / 2 components
    assert float(gradient_loss(inverted, edge, flat, "signed")) == pytest.approx(8 * 2 / 16 / 2, rel=1e-5)


def test_saliency_target_follows_the_source_with_structure():
    textured = (torch.arange(16 * 16, dtype=torch.float32).reshape(1, 1, 16, 16) % 2) * 0.5 + 0.25
    flat = const(0.9)
    target = __import__("LightFusionLib.losses", fromlist=["intensity_target"]).intensity_target(textured, flat, "saliency")
    assert torch.allclose(target, textured, atol=0.01)  # the flat source has no contrast at all
    assert float(intensity_loss(textured, textured, flat, "saliency")) < 0.01
    assert float(intensity_loss(textured, textured, flat, "max")) > 0.4  # max would take the flat 0.9


def test_ssim_window_size_is_a_choice_and_bad_settings_are_refused():
    x = step()
    assert float(ssim(x, x, window_size=7)) == pytest.approx(1.0, abs=1e-5)
    assert float(ssim(x, 1 - x, window_size=7)) < float(ssim(x, 1 - x, window_size=11)) + 0.5
    for bad in (dict(gradient_term="laplace"), dict(intensity_target="mean"), dict(ssim_window=8)):
        with pytest.raises(ValueError):
            LossWeights(1.0, 1.0, 1.0, **bad)
    weights = LossWeights(1.0, 1.0, 1.0, gradient_term="signed", intensity_target="saliency", ssim_window=7)
    total, parts = FusionLoss(weights)(x, x, const(0.5))
    assert float(parts["gradient"]) == pytest.approx(0.0, abs=1e-6)
