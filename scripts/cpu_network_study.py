"""Issue 15's question: can LightFusionNet itself run faster on a CPU than OpenVINO's f32 runs it?

Three ideas, each measured against the shipped ONNX model on the same machine, in the same run,
rounds alternated and medians of ``--rounds``:

    python scripts/cpu_network_study.py merged  # both encoder streams as one grouped graph
    python scripts/cpu_network_study.py tiles   # per-pixel rate by plane size (cache-sized tiles?)
    python scripts/cpu_network_study.py int8    # OpenVINO int8 after NNCF calibration (pip install nncf)

- ``merged``: the MRI and PET/SPECT/CT encoders share their layout and dilations, so the two streams
  can run as one graph of grouped convolutions on 32 channels (the mean fusion folded into the
  decoder's first depthwise-separable block). Same function (checked to 0.001 grey levels), half the
  operators.
- ``tiles``: a network of depthwise and 1x1 convolutions on 16-channel maps moves a lot of memory
  for its arithmetic; if smaller planes ran much faster per pixel, cutting a plane into tiles (with
  the 10-pixel receptive-field halo) would pay.
- ``int8``: post-training quantisation (NNCF, 64 calibration planes drawn from all but the task's
  first case), scored on up to 48 planes of that first case against f32: grey-level error of the
  fused luma and single-stream planes/s.

Results are printed and appended to ``--out`` (JSON lines). The ones behind the README's *Speed*
section are kept in ``scripts/cpu_network_study_results.jsonl`` (2 vCPUs of an Ice Lake Xeon).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "harvard" / "train"
TASKS = ("pet-mri", "spect-mri", "ct-mri")


def merged_streams(net):
    """LightFusionNet (PCA attention, depthwise-separable convs) -> an equivalent module whose two
    encoder streams run as one set of grouped convolutions. forward(mri, other) (N,1,H,W) each ->
    (N,1,H,W)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    c = net.config.width

    def cat(a, b, dim=0):
        return torch.cat([a.detach(), b.detach()], dim)

    def grouped(a: nn.Conv2d, b: nn.Conv2d, mask=None) -> nn.Conv2d:
        depthwise = a.groups > 1
        conv = nn.Conv2d(2 * a.in_channels, 2 * a.out_channels, a.kernel_size, padding=a.padding,
                         dilation=a.dilation, groups=2 * a.groups if depthwise else 2)
        conv.weight.data = cat(a.weight, b.weight) * (1 if mask is None else mask)
        conv.bias.data = cat(a.bias, b.bias)
        return conv

    class Merged(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            em, eo = net.encoder_mri.body, net.encoder_other.body
            self.stem = grouped(em[0], eo[0])
            self.blocks = nn.Sequential(*[m for k in range(len(net.config.encoder_dilations))
                                          for m in (grouped(em[2 + k].conv[0], eo[2 + k].conv[0]),
                                                    grouped(em[2 + k].conv[1], eo[2 + k].conv[1]),
                                                    nn.LeakyReLU(0.1))])
            pa, pb = net.attention_mri, net.attention_other
            self.predict = grouped(pa.predict, pb.predict, pa.context_mask)
            self.squeeze, self.excite = grouped(pa.squeeze, pb.squeeze), grouped(pa.excite, pb.excite)
            # decoder block 1 on the mean of the streams = a depthwise conv on both (halved), then
            # the pointwise conv summing the two halves
            dw, pw = net.decoder[0].conv
            self.fuse_dw = nn.Conv2d(2 * c, 2 * c, 3, padding=1, groups=2 * c)
            self.fuse_dw.weight.data, self.fuse_dw.bias.data = cat(dw.weight, dw.weight) * 0.5, cat(dw.bias, dw.bias) * 0.5
            self.fuse_pw = nn.Conv2d(2 * c, c, 1)
            self.fuse_pw.weight.data, self.fuse_pw.bias.data = cat(pw.weight, pw.weight, 1), pw.bias.detach().clone()
            self.rest = nn.Sequential(*list(net.decoder)[1:])

        def forward(self, mri, other):
            x = self.blocks(F.leaky_relu(self.stem(torch.cat([mri, other], 1)), 0.1))
            weights = torch.sigmoid(self.excite(F.relu(self.squeeze((self.predict(x) - x).abs()))))
            x = x + x * weights
            return self.rest(F.leaky_relu(self.fuse_pw(self.fuse_dw(x)), 0.1))

    return Merged().eval()


def _rates(backends: dict, planes: np.ndarray, rounds: int, batch: int = 16) -> dict:
    """Median planes/s of each backend over ``rounds`` alternated rounds on ``planes`` (N,2,H,W)."""
    for b in backends.values():
        b(planes[:batch, 0], planes[:batch, 1])
    times = {k: [] for k in backends}
    for _ in range(rounds):
        for name, b in backends.items():
            t0 = time.perf_counter()
            for i in range(0, len(planes), batch):
                b(planes[i:i + batch, 0], planes[i:i + batch, 1])
            times[name].append(len(planes) / (time.perf_counter() - t0))
    return {k: round(float(np.median(v)), 1) for k, v in times.items()}


def study_merged(task: str, rounds: int) -> dict:
    import torch

    from LightFusionLib.backends import OnnxBackend, OpenVinoBackend
    from LightFusionLib.models import load_model, shipped_model_path
    from LightFusionLib.onnx_export import export_module

    net, _ = load_model(None, task)
    merged = merged_streams(net.eval())
    planes = np.random.default_rng(0).random((64, 2, 256, 256), dtype=np.float32)
    with torch.no_grad():
        x = torch.from_numpy(planes[:4])
        max_diff = float((merged(x[:, :1], x[:, 1:]) - net(x[:, :1], x[:, 1:])).abs().max()) * 255
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "merged.onnx"
        export_module(merged, path)
        shipped = shipped_model_path(task, ".onnx")
        backends = {f"{kind}-{cls.name}": cls(task, p) for kind, p in (("shipped", shipped), ("merged", path))
                    for cls in (OnnxBackend, OpenVinoBackend)}
        rates = _rates(backends, planes, rounds)
    return {"study": "merged", "task": task, "max_grey_level_difference": round(max_diff, 5), "planes_per_s": rates}


def study_tiles(task: str, rounds: int) -> dict:
    from LightFusionLib.backends import OnnxBackend, OpenVinoBackend
    from LightFusionLib.models import shipped_model_path

    rng = np.random.default_rng(0)
    path = shipped_model_path(task, ".onnx")
    rows = {}
    for cls in (OpenVinoBackend, OnnxBackend):
        backend = cls(task, path)
        for size in (64, 96, 128, 148, 192, 256, 512):
            n = int(np.clip(64 * (256 / size) ** 2, 8, 512))
            planes = rng.random((n, 2, size, size), dtype=np.float32)
            rate = _rates({cls.name: backend}, planes, rounds)[cls.name]
            rows[f"{cls.name}-{size}"] = round(rate * size * size / 1e6, 2)  # megapixels/s
    return {"study": "tiles", "task": task, "megapixels_per_s": rows,
            "note": "a 256x256 plane cut into 4 tiles of 128 + a 10-pixel halo computes 148x148 x 4 = 1.34x the pixels"}


def study_int8(task: str, rounds: int) -> dict:
    try:
        import nncf
    except ImportError:
        raise SystemExit("the int8 study needs NNCF: pip install nncf") from None
    import openvino as ov

    from LightFusionLib.data import find_pairs, load_pairs, split_by_case, to_unit
    from LightFusionLib.models import shipped_model_path

    pairs = find_pairs(DATA, task)
    test_case = sorted({p.case for p in pairs}, key=int)[0]  # kept out of the calibration planes
    train, val = split_by_case(pairs, [test_case])
    rng = np.random.default_rng(0)
    calibration = np.stack(to_unit(load_pairs([train[i] for i in rng.choice(len(train), 64, replace=False)])), 1)
    test = np.stack(to_unit(load_pairs(val[:48])), 1)

    core = ov.Core()
    model = core.read_model(str(shipped_model_path(task, ".onnx")))
    model.reshape({"mri": [1, 1, 256, 256], "other": [1, 1, 256, 256]})
    config = {"INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 1, "INFERENCE_NUM_THREADS": 1}

    def feed(planes, i):
        return {"mri": planes[i:i + 1, :1], "other": planes[i:i + 1, 1:]}

    def run(compiled) -> np.ndarray:
        return np.stack([compiled(feed(test, i))[0][0, 0] for i in range(len(test))]) * 255

    def rate(compiled) -> float:
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for i in range(32):
                compiled(feed(test, i % len(test)))
            times.append(32 / (time.perf_counter() - t0))
        return round(float(np.median(times)), 1)

    f32 = core.compile_model(model, "CPU", config)
    reference = np.rint(run(f32))
    result = {"study": "int8", "task": task, "test_case": test_case, "test_planes": len(test),
              "f32_planes_per_s_one_stream": rate(f32)}
    dataset = nncf.Dataset(range(len(calibration)), lambda i: feed(calibration, i))
    for preset in ("MIXED", "PERFORMANCE"):
        quantized = nncf.quantize(model, dataset, subset_size=len(calibration),
                                  preset=getattr(nncf.QuantizationPreset, preset))
        compiled = core.compile_model(quantized, "CPU", config)
        error = np.abs(np.rint(run(compiled)) - reference)
        result[f"int8_{preset.lower()}"] = {
            "max": float(error.max()), "p99": float(np.percentile(error, 99)), "mean": round(float(error.mean()), 3),
            "share_over_1_level": round(float((error > 1).mean()), 4), "planes_per_s_one_stream": rate(compiled)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", choices=["merged", "tiles", "int8"])
    parser.add_argument("--tasks", default="pet-mri", help="comma-separated (default pet-mri)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "runs" / "cpu_network_study.jsonl"))
    args = parser.parse_args()
    study = {"merged": study_merged, "tiles": study_tiles, "int8": study_int8}[args.study]
    for task in args.tasks.split(","):
        record = study(task, args.rounds)
        print(json.dumps(record), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "a") as fh:
            fh.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
