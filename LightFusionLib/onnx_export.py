"""Export a LightFusion model to ONNX (dynamic batch, height and width) for ONNX Runtime.

Graph: inputs ``mri`` and ``other`` (N,1,H,W) float32 in [0, 1], output ``fused`` (N,1,H,W).
The model's task and config travel in the ONNX metadata (``lightfusion_task``, ``lightfusion_config``)
so the onnx backend can refuse a model of another task.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import LightFusionError
from .fileio import OutputError, atomic_output, check_output_file
from .models import load_model, read_model_file, resolve_model_path

OPSET = 17


def export_onnx(model: str | Path | None, task: str | None, output: str | Path) -> Path:
    """Export ``model`` (a .pt file) or, when None, the shipped model of ``task`` to ``output``."""
    if model is None and task is None:
        raise LightFusionError("give a task or a model file to export")
    output = Path(output)
    if output.suffix.lower() != ".onnx":
        raise OutputError(f"output {output} must end in .onnx")
    check_output_file(output, "output", (Path(model),) if model is not None else ())

    import onnx

    if task is None:
        task = read_model_file(resolve_model_path(model, "pet-mri"))["task"]
    net, payload = load_model(model, task)
    with atomic_output(output) as tmp:
        export_module(net, tmp)
        proto = onnx.load(str(tmp))
        for key, value in (("lightfusion_task", payload["task"]),
                           ("lightfusion_config", json.dumps(payload["config"])),
                           ("lightfusion_meta", json.dumps(payload.get("meta", {}), default=str))):
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        onnx.checker.check_model(proto)
        onnx.save(proto, str(tmp))
    return output


def export_module(net, path: str | Path) -> None:
    """Write ``net`` (forward(mri, other), each (N,1,H,W) -> (N,1,H,W)) to ``path`` as this project's
    ONNX graph: inputs ``mri`` and ``other``, output ``fused``, dynamic batch and plane size; no metadata."""
    import torch

    example = torch.rand(1, 1, 64, 64)
    dynamic = {0: "batch", 2: "height", 3: "width"}
    torch.onnx.export(
        net, (example, example), str(path), input_names=["mri", "other"], output_names=["fused"],
        dynamic_axes={"mri": dynamic, "other": dynamic, "fused": dynamic}, opset_version=OPSET,
        dynamo=False,  # the TorchScript exporter gives a compact graph with plain Conv nodes
    )
