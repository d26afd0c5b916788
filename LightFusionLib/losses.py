"""Unsupervised fusion losses (paper eqs. 1-5). Tensors are (N,1,H,W) in [0, 1]."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def sobel_magnitude(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Sobel gradient magnitude sqrt(gx^2 + gy^2). (N,1,H,W) -> (N,1,H,W).

    Replicate padding, so a flat image has zero gradient at its border too; ``eps`` keeps the
    square root differentiable where the image is flat.
    """
    kernel = torch.stack([_SOBEL_X, _SOBEL_X.T]).unsqueeze(1).to(x)  # (2,1,3,3)
    g = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel)
    return torch.sqrt(g.pow(2).sum(dim=1, keepdim=True) + eps) - eps**0.5


def sobel(x: torch.Tensor) -> torch.Tensor:
    """Signed Sobel gradients (gx, gy), replicate padding. (N,1,H,W) -> (N,2,H,W)."""
    kernel = torch.stack([_SOBEL_X, _SOBEL_X.T]).unsqueeze(1).to(x)
    return F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel)


def local_contrast(x: torch.Tensor, size: int = 11) -> torch.Tensor:
    """Mean |x - local mean| over a size x size box: a saliency map. (N,1,H,W) -> (N,1,H,W)."""
    pad = size // 2
    mean = F.avg_pool2d(F.pad(x, (pad, pad, pad, pad), mode="replicate"), size, stride=1)
    dev = (x - mean).abs()
    return F.avg_pool2d(F.pad(dev, (pad, pad, pad, pad), mode="replicate"), size, stride=1)


def intensity_target(a: torch.Tensor, b: torch.Tensor, kind: str = "max") -> torch.Tensor:
    """The intensity term's target. 'max': element-wise max(A, B) (eq. 1). 'saliency': A and B
    weighted by their local contrast (each pixel leans to the source with more structure there).
    (N,1,H,W) x2 -> (N,1,H,W)."""
    if kind == "max":
        return torch.maximum(a, b)
    if kind == "saliency":
        sa, sb = local_contrast(a), local_contrast(b)
        wa = (sa + 1e-4) / (sa + sb + 2e-4)
        return wa * a + (1 - wa) * b
    raise ValueError(f"unknown intensity target {kind!r}")


def intensity_loss(fused: torch.Tensor, a: torch.Tensor, b: torch.Tensor, target: str = "max") -> torch.Tensor:
    """Eq. 1: mean |F - max(A, B)| (or another :func:`intensity_target`)."""
    return (fused - intensity_target(a, b, target)).abs().mean()


def gradient_loss(fused: torch.Tensor, a: torch.Tensor, b: torch.Tensor, kind: str = "sobel") -> torch.Tensor:
    """Eq. 2, 'sobel': mean | |grad F| - max(|grad A|, |grad B|) |.

    'signed': mean |grad F - grad S| over both components, S the source whose gradient is larger
    at that pixel, so the direction (sign) of the edge is kept as well as its strength.
    """
    if kind == "sobel":
        return (sobel_magnitude(fused) - torch.maximum(sobel_magnitude(a), sobel_magnitude(b))).abs().mean()
    if kind == "signed":
        ga, gb = sobel(a), sobel(b)
        take_a = ga.pow(2).sum(1, keepdim=True) >= gb.pow(2).sum(1, keepdim=True)
        return (sobel(fused) - torch.where(take_a, ga, gb)).abs().mean()
    raise ValueError(f"unknown gradient term {kind!r}")


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).view(1, 1, size, size)


def ssim(x: torch.Tensor, y: torch.Tensor, k1: float = 0.01, k2: float = 0.03, window_size: int = 11) -> torch.Tensor:
    """Mean SSIM (eq. 3) with an 11x11 Gaussian window (sigma 1.5 x size/11), data range 1, 'valid' region.

    The paper's "C1 = 0.01, C2 = 0.03" are the usual K1, K2; C = (K * range)^2 as in Wang et al.
    """
    window = _gaussian_window(window_size, 1.5 * window_size / 11).to(x)
    mu_x, mu_y = F.conv2d(x, window), F.conv2d(y, window)
    sxx = F.conv2d(x * x, window) - mu_x**2
    syy = F.conv2d(y * y, window) - mu_y**2
    sxy = F.conv2d(x * y, window) - mu_x * mu_y
    c1, c2 = k1**2, k2**2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return ssim_map.mean()


def ssim_loss(fused: torch.Tensor, a: torch.Tensor, b: torch.Tensor, window_size: int = 11) -> torch.Tensor:
    """Eq. 4 against both sources: 1 - (SSIM(F, A) + SSIM(F, B)) / 2."""
    return 1.0 - 0.5 * (ssim(fused, a, window_size=window_size) + ssim(fused, b, window_size=window_size))


GRADIENT_TERMS = ("sobel", "signed")
INTENSITY_TARGETS = ("max", "saliency")


@dataclass(frozen=True)
class LossWeights:
    """Weights of the total loss (the paper states two weightings, see LOSS_PRESETS) and the form
    of each term: the defaults are the paper's (Sobel magnitude, element-wise max, 11x11 SSIM)."""

    intensity: float
    gradient: float
    ssim: float
    gradient_term: str = "sobel"
    intensity_target: str = "max"
    ssim_window: int = 11

    def __post_init__(self) -> None:
        if self.gradient_term not in GRADIENT_TERMS:
            raise ValueError(f"gradient term must be one of {', '.join(GRADIENT_TERMS)}, got {self.gradient_term!r}")
        if self.intensity_target not in INTENSITY_TARGETS:
            raise ValueError(f"intensity target must be one of {', '.join(INTENSITY_TARGETS)}, "
                             f"got {self.intensity_target!r}")
        if self.ssim_window < 3 or self.ssim_window % 2 == 0:
            raise ValueError(f"SSIM window must be odd and >= 3, got {self.ssim_window}")

    def to_dict(self) -> dict:
        return asdict(self)


# Eq. 5 of the paper and the weighting its ablation text (Table 5) calls best.
PAPER_EQ5 = LossWeights(intensity=20.0, gradient=100.0, ssim=50.0)
PAPER_ABLATION = LossWeights(intensity=100.0, gradient=50.0, ssim=20.0)
LOSS_PRESETS = {"eq5": PAPER_EQ5, "ablation": PAPER_ABLATION}


class FusionLoss(nn.Module):
    """Weighted sum of intensity, gradient and SSIM losses.

    forward(fused, a, b) -> (total, {"intensity": .., "gradient": .., "ssim": ..}) with scalar tensors.
    """

    def __init__(self, weights: LossWeights = PAPER_EQ5) -> None:
        super().__init__()
        self.weights = weights

    def forward(self, fused: torch.Tensor, a: torch.Tensor, b: torch.Tensor):
        w = self.weights
        parts = {
            "intensity": intensity_loss(fused, a, b, w.intensity_target),
            "gradient": gradient_loss(fused, a, b, w.gradient_term),
            "ssim": ssim_loss(fused, a, b, w.ssim_window),
        }
        total = w.intensity * parts["intensity"] + w.gradient * parts["gradient"] + w.ssim * parts["ssim"]
        return total, parts
