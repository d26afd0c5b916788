"""LightFusionNet: dual-stream depthwise-separable CNN with Predictive Context Attention.

Shapes follow MONAI's habit: N batch, C channels, H x W plane. The network is fully
convolutional and keeps full resolution throughout (no pooling), so any H x W works.

Inputs: ``mri`` (N,1,H,W) and ``other`` (N,1,H,W) in [0, 1] (``other`` is the PET/SPECT luma
or the CT). Output: the fused luma (N,1,H,W) in [0, 1].
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import LightFusionError

ATTENTION_VARIANTS = ("pca", "conv", "channel", "spatial", "none")
CONV_VARIANTS = ("dsc", "standard")


@dataclass(frozen=True)
class NetworkConfig:
    """Architecture hyper-parameters (the ablation axes of the paper's Tables 3 and 4)."""

    width: int = 16  # base channel width C
    reduction: int = 4  # PCA channel bottleneck ratio R
    attention: str = "pca"  # one of ATTENTION_VARIANTS
    conv: str = "dsc"  # depthwise-separable or standard 3x3 convolutions
    encoder_dilations: tuple[int, ...] = (1, 2, 4)  # growing receptive field per encoder block

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_VARIANTS:
            raise LightFusionError(f"attention must be one of {ATTENTION_VARIANTS}, got {self.attention!r}")
        if self.conv not in CONV_VARIANTS:
            raise LightFusionError(f"conv must be one of {CONV_VARIANTS}, got {self.conv!r}")
        if self.width < 2 or self.reduction < 1 or self.width % self.reduction:
            raise LightFusionError(f"width {self.width} must be a multiple of reduction {self.reduction}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "NetworkConfig":
        d = dict(d)
        if "encoder_dilations" in d:
            d["encoder_dilations"] = tuple(d["encoder_dilations"])
        return cls(**d)


def _act() -> nn.Module:
    return nn.LeakyReLU(0.1, inplace=True)


class ConvBlock(nn.Module):
    """3x3 convolution + LeakyReLU, depthwise-separable (dw 3x3 then pw 1x1) or standard.

    (N, cin, H, W) -> (N, cout, H, W).
    """

    def __init__(self, cin: int, cout: int, kind: str = "dsc", dilation: int = 1) -> None:
        super().__init__()
        if kind == "dsc":
            self.conv = nn.Sequential(
                nn.Conv2d(cin, cin, 3, padding=dilation, dilation=dilation, groups=cin),
                nn.Conv2d(cin, cout, 1),
            )
        else:
            self.conv = nn.Conv2d(cin, cout, 3, padding=dilation, dilation=dilation)
        self.act = _act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))


class PredictiveContextAttention(nn.Module):
    """Predictive Context Attention (paper, Fig. 2B).

    Each feature is predicted from its 3x3 spatial neighbourhood *excluding itself* (a depthwise
    convolution whose centre tap is masked), surprise = |predicted - actual|, a channel bottleneck
    (C -> C/R -> C) turns surprise into sigmoid weights, and the input is re-weighted residually:
    ``x + x * w``. (N, C, H, W) -> (N, C, H, W).
    """

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.predict = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        mask = torch.ones(1, 1, 3, 3)
        mask[..., 1, 1] = 0.0  # the prediction must not see the value it predicts
        self.register_buffer("context_mask", mask, persistent=False)
        self.squeeze = nn.Conv2d(channels, channels // reduction, 1)
        self.excite = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        predicted = F.conv2d(x, self.predict.weight * self.context_mask, self.predict.bias,
                             padding=1, groups=x.shape[1])
        surprise = (predicted - x).abs()
        weights = torch.sigmoid(self.excite(F.relu(self.squeeze(surprise))))
        return x + x * weights


class ConvRefinement(nn.Module):
    """Ablation 'PCA -> Conv': a residual depthwise-separable convolution in place of attention."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = ConvBlock(channels, channels, "dsc")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class ChannelAttention(nn.Module):
    """Ablation 'PCA -> CA': squeeze-and-excitation weights from global average pooling."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(channels, channels // reduction, 1)
        self.excite = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=(2, 3), keepdim=True)
        return x + x * torch.sigmoid(self.excite(F.relu(self.squeeze(pooled))))


class SpatialAttention(nn.Module):
    """Ablation 'PCA -> SA': CBAM-style spatial weights from channel mean and max (7x7 conv)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, 7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x + x * torch.sigmoid(self.conv(stats))


def _attention(cfg: NetworkConfig) -> nn.Module:
    if cfg.attention == "pca":
        return PredictiveContextAttention(cfg.width, cfg.reduction)
    if cfg.attention == "conv":
        return ConvRefinement(cfg.width)
    if cfg.attention == "channel":
        return ChannelAttention(cfg.width, cfg.reduction)
    if cfg.attention == "spatial":
        return SpatialAttention()
    return nn.Identity()


class Encoder(nn.Module):
    """One modality's stream: 3x3 stem (1 -> C), then dilated blocks. (N,1,H,W) -> (N,C,H,W)."""

    def __init__(self, cfg: NetworkConfig) -> None:
        super().__init__()
        # A single input channel makes a depthwise stem meaningless, so the stem is a plain conv.
        layers: list[nn.Module] = [nn.Conv2d(1, cfg.width, 3, padding=1), _act()]
        layers += [ConvBlock(cfg.width, cfg.width, cfg.conv, d) for d in cfg.encoder_dilations]
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class LightFusionNet(nn.Module):
    """Two encoders, attention per stream, element-wise mean fusion, DSC decoder, 1x1 conv, sigmoid.

    forward(mri (N,1,H,W), other (N,1,H,W)) -> fused (N,1,H,W), all in [0, 1].
    """

    def __init__(self, config: NetworkConfig | None = None, **kwargs) -> None:
        super().__init__()
        cfg = config or NetworkConfig(**kwargs)
        self.config = cfg
        self.encoder_mri = Encoder(cfg)
        self.encoder_other = Encoder(cfg)
        self.attention_mri = _attention(cfg)
        self.attention_other = _attention(cfg)
        half = max(cfg.width // 2, 1)
        self.decoder = nn.Sequential(
            ConvBlock(cfg.width, cfg.width, cfg.conv),
            ConvBlock(cfg.width, half, cfg.conv),
            nn.Conv2d(half, 1, 1),
            nn.Sigmoid(),
        )

    def forward(self, mri: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        f_mri = self.attention_mri(self.encoder_mri(mri))
        f_other = self.attention_other(self.encoder_other(other))
        return self.decoder((f_mri + f_other) * 0.5)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_macs(model: nn.Module, height: int = 256, width: int = 256) -> int:
    """Multiply-accumulates of one forward pass on one (1,1,H,W) pair, counted by forward hooks.

    Counts convolutions (k*k*cin/groups MACs per output element) and the element-wise work of the
    attention and fusion steps (one MAC per element per multiply/abs/add). The paper's "FLOPs"
    follow the usual thop/ptflops convention, which is MACs; 2x this is the arithmetic FLOP count.
    """
    total = 0

    def conv_hook(mod: nn.Conv2d, inp, out) -> None:
        nonlocal total
        k = mod.kernel_size[0] * mod.kernel_size[1] * mod.in_channels // mod.groups
        total += out.numel() * k

    def elementwise_hook(mod: nn.Module, inp, out) -> None:
        nonlocal total
        # PCA: |pred - x| (2 ops), x + x*w (2 ops); other attentions: x + x*w (2 ops).
        total += out.numel() * (4 if isinstance(mod, PredictiveContextAttention) else 2)

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, (PredictiveContextAttention, ChannelAttention, SpatialAttention)):
            hooks.append(m.register_forward_hook(elementwise_hook))
    # The PCA's masked depthwise prediction is a functional conv: count it explicitly below.
    try:
        with torch.no_grad():
            x = torch.zeros(1, 1, height, width)
            model.eval()(x, x)
    finally:
        for h in hooks:
            h.remove()
    for m in model.modules():
        if isinstance(m, PredictiveContextAttention):
            total += m.predict.out_channels * height * width * 9
    total += model.config.width * height * width  # mean fusion
    return int(total)
