"""LightFusionNet: shapes, ranges, size, gradient flow, the PCA's masked context, ablation variants."""
import pytest
import torch

from LightFusionLib.network import (ATTENTION_VARIANTS, LightFusionNet, NetworkConfig,
                                    PredictiveContextAttention, count_macs, count_parameters)


@pytest.mark.parametrize("shape", [(1, 1, 256, 256), (3, 1, 37, 50), (2, 1, 8, 8)])
def test_output_shape_and_range(shape):
    torch.manual_seed(0)
    net = LightFusionNet().eval()
    mri, other = torch.rand(shape), torch.rand(shape)
    with torch.no_grad():
        out = net(mri, other)
    assert out.shape == shape
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


def test_default_size_matches_paper():
    net = LightFusionNet()
    params = count_parameters(net)
    macs = count_macs(net, 256, 256)
    # Paper: 0.004 M parameters, 0.29 G(MAC) at 256x256.
    assert 3500 <= params <= 4500, params
    assert 0.24e9 <= macs <= 0.32e9, macs
    # Full-resolution convolutions: MACs per pixel are about the weight count.
    assert abs(macs / (256 * 256) - params) / params < 0.2


def test_width_and_reduction_scale_the_model():
    small, default, large = (count_parameters(LightFusionNet(width=w)) for w in (8, 16, 32))
    assert small < default < large
    r2, r4, r8 = (count_parameters(LightFusionNet(reduction=r)) for r in (2, 4, 8))
    assert r2 > r4 > r8
    assert count_parameters(LightFusionNet(conv="standard")) > 3 * default


def test_gradient_reaches_every_parameter():
    torch.manual_seed(0)
    net = LightFusionNet()
    mri, other = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    net(mri, other).mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0, name


def test_pca_prediction_ignores_the_predicted_value():
    pca = PredictiveContextAttention(4, reduction=2)
    with torch.no_grad():
        pca.predict.weight.fill_(1.0)
        pca.predict.bias.zero_()
    x = torch.zeros(1, 4, 5, 5)
    x[..., 2, 2] = 1.0
    captured = {}

    def keep_input(module, inp, out):
        captured["surprise"] = inp[0]

    pca.squeeze.register_forward_hook(keep_input)
    pca(x)
    surprise = captured["surprise"]
    # At the impulse the context (neighbours, all 0) predicts 0: surprise = |0 - 1| = 1.
    assert torch.allclose(surprise[..., 2, 2], torch.ones(1, 4))
    # Each neighbour sees the impulse in its context: predicted 1, actual 0.
    assert torch.allclose(surprise[..., 1, 1], torch.ones(1, 4))
    assert torch.allclose(surprise[..., 0, 0], torch.zeros(1, 4))


def test_pca_is_residual_reweighting():
    pca = PredictiveContextAttention(8)
    x = torch.rand(2, 8, 6, 6)
    with torch.no_grad():
        y = pca(x)
    ratio = y / x
    assert float(ratio.min()) >= 1.0 - 1e-6 and float(ratio.max()) <= 2.0 + 1e-6


@pytest.mark.parametrize("attention", ATTENTION_VARIANTS)
@pytest.mark.parametrize("conv", ["dsc", "standard"])
def test_ablation_variants_run(attention, conv):
    net = LightFusionNet(NetworkConfig(attention=attention, conv=conv))
    out = net(torch.rand(1, 1, 24, 24), torch.rand(1, 1, 24, 24))
    assert out.shape == (1, 1, 24, 24)


def test_config_validation_and_round_trip():
    with pytest.raises(ValueError, match="attention"):
        NetworkConfig(attention="transformer")
    with pytest.raises(ValueError, match="multiple"):
        NetworkConfig(width=10, reduction=4)
    cfg = NetworkConfig(width=8, reduction=2, attention="channel")
    assert NetworkConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("task", ["pet-mri", "ct-mri"])
def test_cpu_study_merged_streams_graph_is_the_same_network(task):
    """scripts/cpu_network_study.py times a 'merged' graph (both encoders as grouped convolutions)
    against the shipped one; its numbers mean something only if the two compute the same fusion."""
    import importlib.util
    from pathlib import Path

    from LightFusionLib.models import load_model

    path = Path(__file__).resolve().parents[1] / "scripts" / "cpu_network_study.py"
    spec = importlib.util.spec_from_file_location("cpu_network_study", path)
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    net, _ = load_model(None, task)
    merged = study.merged_streams(net.eval())
    torch.manual_seed(1)
    mri, other = torch.rand(2, 1, 40, 56), torch.rand(2, 1, 40, 56)
    with torch.no_grad():
        expected, got = net(mri, other), merged(mri, other)
    assert got.shape == expected.shape
    assert float((got - expected).abs().max()) * 255 < 0.01
    # half the operator count is the point: 2 x (stem + 3 blocks + attention) became one set
    assert sum(isinstance(m, torch.nn.Conv2d) for m in merged.modules()) < sum(
        isinstance(m, torch.nn.Conv2d) for m in net.modules())
