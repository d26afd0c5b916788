"""Model files: saving, loading, and the shipped per-task models in ``LightFusionLib/Resources/Models``.

A model file (``.pt``) is a torch pickle of plain data:
``{"format": FORMAT, "task": str, "config": NetworkConfig dict, "state_dict": ..., "meta": {...}}``;
training checkpoints add optimizer/scheduler/RNG state under ``"training"``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import LightFusionError
from .fileio import atomic_output
from .tasks import check_task

FORMAT = "lightfusion-model/1"


class ModelError(LightFusionError):
    """A model file that cannot be used (unreadable, not a LightFusion model, wrong task)."""


def models_dir() -> Path:
    """Folder of the shipped models: $LIGHTFUSION_MODELS when set, else ``Resources/Models`` inside
    the package. One place for every install: a source checkout, a wheel (package data) and the
    Slicer extension (its CMake installs the same files beside the installed package)."""
    env = os.environ.get("LIGHTFUSION_MODELS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent / "Resources" / "Models"


def shipped_model_path(task: str, suffix: str = ".pt") -> Path:
    """Path of the shipped model for ``task`` ('pet-mri' -> <models_dir>/pet-mri.pt)."""
    path = models_dir() / f"{check_task(task)}{suffix}"
    if not path.is_file():
        raise ModelError(f"no shipped model for task {task!r} at {path}")
    return path


def resolve_model_path(model: str | Path | None, task: str, suffix: str = ".pt") -> Path:
    """``model`` given -> that file (must exist); None -> the shipped model of ``task``."""
    if model is None:
        return shipped_model_path(task, suffix)
    path = Path(model)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    return path


def save_model(path: str | Path, model, task: str, meta: dict | None = None,
               training: dict | None = None) -> None:
    """Write ``model`` (a LightFusionNet) atomically, with its config, task and metadata."""
    import torch

    payload: dict[str, Any] = {
        "format": FORMAT,
        "task": check_task(task),
        "config": model.config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": meta or {},
    }
    if training is not None:
        payload["training"] = training
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)


def read_model_file(path: str | Path) -> dict:
    """Load a model/checkpoint payload (CPU tensors). Raises ModelError."""
    import torch

    path = Path(path)
    try:
        # weights_only: a model file is data; never run code from a file a user picked.
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad file
        raise ModelError(f"model file {path} does not load: {type(exc).__name__}: {exc}".splitlines()[0]) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelError(f"{path} is not a LightFusion model file")
    return payload


def load_model(model: str | Path | None, task: str, strict_task: bool = True):
    """-> (LightFusionNet in eval mode on CPU, payload). ``model`` None = the shipped one.

    A model trained for another task is refused unless ``strict_task`` is False.
    """
    from .network import LightFusionNet, NetworkConfig

    task = check_task(task)
    path = resolve_model_path(model, task)
    payload = read_model_file(path)
    if strict_task and payload["task"] != task:
        raise ModelError(f"model {path} was trained for {payload['task']}, not {task}")
    try:
        net = LightFusionNet(NetworkConfig.from_dict(payload["config"]))
    except (KeyError, TypeError, ValueError) as exc:  # a model file whose config is not one we wrote
        raise ModelError(f"model {path} has an unusable network config: {exc}") from None
    try:
        net.load_state_dict(payload["state_dict"])
    except RuntimeError as exc:
        raise ModelError(f"model {path} has weights that do not fit its config: {str(exc).splitlines()[0]}") from None
    return net.eval(), payload
