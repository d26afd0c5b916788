"""``lightfusion info``: what this installation has: version, shipped models, backends and devices.

Models are listed from :func:`LightFusionLib.models.models_dir` (``$LIGHTFUSION_MODELS`` or the
package's ``Resources/Models``) with their task and parameter count. An ONNX file is read without ONNX
Runtime or the ``onnx`` package (a few lines of protobuf wire format: the graph's initializers and the
model's metadata), so this works on the light install; a ``.pt`` file needs PyTorch to be counted.
"""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import sys
from pathlib import Path

from . import __version__
from .backends import choose_backend, is_installed
from .errors import LightFusionError
from .models import models_dir

LIBRARIES = ("numpy", "SimpleITK", "onnxruntime", "torch", "pydicom", "nibabel", "tqdm")


# --- ONNX files, read with the protobuf wire format ----------------------------------------------
def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


def _fields(buf: bytes):
    """(field number, wire type, value) of a protobuf message; value is an int or bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        elif wire == 2:
            length, i = _varint(buf, i)
            value, i = buf[i:i + length], i + length
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def read_onnx_summary(path: str | Path) -> dict:
    """{"parameters": number of values in the graph's initializers (the weights), "metadata": {key: value}}
    of an ONNX model file (ModelProto: graph = 7, metadata_props = 14; GraphProto.initializer = 5;
    TensorProto.dims = 1). Raises ValueError for a file that is not one."""
    buf = Path(path).read_bytes()
    parameters, metadata = 0, {}
    for number, wire, value in _fields(buf):
        if number == 7 and wire == 2:
            for g_number, g_wire, g_value in _fields(value):
                if g_number != 5 or g_wire != 2:
                    continue
                dims: list[int] = []
                for t_number, t_wire, t_value in _fields(g_value):
                    if t_number == 1 and t_wire == 0:
                        dims.append(t_value)
                    elif t_number == 1 and t_wire == 2:  # packed
                        j = 0
                        while j < len(t_value):
                            d, j = _varint(t_value, j)
                            dims.append(d)
                count = 1
                for d in dims:
                    count *= d
                parameters += count
        elif number == 14 and wire == 2:
            entry = {n: v for n, w, v in _fields(value) if w == 2}
            metadata[entry.get(1, b"").decode(errors="replace")] = entry.get(2, b"").decode(errors="replace")
    return {"parameters": parameters, "metadata": metadata}


def describe_model(path: Path) -> dict:
    """{"file", "format", "task", "parameters", "bytes"} of a model file; "error" when it cannot be read."""
    entry: dict = {"file": path.name, "format": path.suffix.lstrip("."), "task": None, "parameters": None,
                   "bytes": path.stat().st_size}
    try:
        if path.suffix.lower() == ".onnx":
            summary = read_onnx_summary(path)
            entry["task"] = summary["metadata"].get("lightfusion_task")
            entry["parameters"] = summary["parameters"]
        elif is_installed("torch"):
            from .models import load_model, read_model_file

            task = read_model_file(path)["task"]
            net, _ = load_model(path, task, strict_task=False)
            entry["task"], entry["parameters"] = task, sum(p.numel() for p in net.parameters())
        else:
            entry["note"] = "PyTorch not installed (pip install 'lightfusion[torch]') to read it"
    except (LightFusionError, ValueError, IndexError, OSError) as exc:
        entry["error"] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if entry["task"] is None and "error" not in entry:
        entry["task"] = path.name.split(".")[0]
    return entry


# --- backends and devices ------------------------------------------------------------------------
def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def backends_info() -> dict:
    """Per backend: installed, version, devices it can use here."""
    out: dict = {}
    if is_installed("onnxruntime"):
        import onnxruntime as ort

        providers = ort.get_available_providers()
        out["onnx"] = {"installed": True, "version": ort.__version__,
                       "devices": ["cpu"] + (["cuda"] if "CUDAExecutionProvider" in providers else []),
                       "providers": providers}
    else:
        out["onnx"] = {"installed": False, "devices": [], "install": "pip install onnxruntime"}
    if is_installed("openvino"):
        import openvino

        out["openvino"] = {"installed": True, "version": openvino.__version__.split("-")[0], "devices": ["cpu"]}
    else:
        out["openvino"] = {"installed": False, "devices": [],
                           "install": "pip install 'lightfusion[openvino]' (faster than ONNX Runtime on some CPUs)"}
    if is_installed("torch"):
        import torch

        cuda = torch.cuda.is_available()
        out["torch"] = {"installed": True, "version": torch.__version__,
                        "devices": ["cpu"] + (["cuda"] if cuda else []),
                        "cuda_build": torch.version.cuda,
                        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []}
    else:
        out["torch"] = {"installed": False, "devices": [],
                        "install": "pip install 'lightfusion[torch]' (training, CUDA GPUs, fp16)"}
    return out


def gather_info() -> dict:
    folder = models_dir()
    models = ([describe_model(p) for p in sorted(folder.iterdir()) if p.suffix.lower() in (".onnx", ".pt")]
              if folder.is_dir() else [])
    try:
        default = "{} on {}".format(*choose_backend("auto", "auto"))
    except LightFusionError as exc:
        default = f"none ({exc})"
    return {
        "version": __version__,
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "package": str(Path(__file__).resolve().parent),
        "models_dir": str(folder),
        "models_dir_from": "LIGHTFUSION_MODELS" if os.environ.get("LIGHTFUSION_MODELS") else "package data",
        "models": models,
        "backends": backends_info(),
        "default_backend": default,
        "libraries": {name: _version(name) for name in LIBRARIES},
    }


def format_info(info: dict) -> str:
    lines = [f"lightfusion {info['version']}",
             f"python {info['python']}",
             f"package {info['package']}",
             f"models in {info['models_dir']} (from {info['models_dir_from']}):"]
    if not info["models"]:
        lines.append("  none found")
    for m in info["models"]:
        params = f"{m['parameters']:,} parameters" if m["parameters"] is not None else m.get("note", m.get("error", ""))
        lines.append(f"  {m['task'] or '?':<10} {m['file']:<16} {params}")
    lines.append("backends:")
    for name, b in info["backends"].items():
        if b["installed"]:
            extra = f"; GPUs: {', '.join(b['gpus'])}" if b.get("gpus") else ""
            lines.append(f"  {name:<8} {b['version']:<14} devices: {', '.join(b['devices'])}{extra}")
        else:
            lines.append(f"  {name:<8} not installed ({b['install']})")
    lines.append(f"default (--backend auto --device auto): {info['default_backend']}")
    lines.append("libraries: " + ", ".join(f"{k} {v}" for k, v in info["libraries"].items() if v))
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    print(json.dumps(gather_info(), indent=2))
