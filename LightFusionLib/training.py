"""Unsupervised training of LightFusionNet on paired 2-D slices (the paper's recipe).

Adam (lr 3e-3, cosine decay to 0; the paper's step decay x0.5 every 50 epochs is ``schedule="step"``),
random crops with flips, batch 4. Each epoch draws
``crops_per_image`` random crops from every training image. A checkpoint (model + optimizer +
scheduler + RNG states) is written atomically after every epoch beside the output, so ``resume``
continues exactly where it stopped; on CPU a fixed seed reproduces the same weights.
"""
from __future__ import annotations

import csv
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import DataError, find_pairs, load_pairs, random_crops, split_by_case, to_unit
from .errors import LightFusionError
from .fileio import OutputError, atomic_output, check_output_file
from .losses import LOSS_PRESETS, LossWeights
from .tasks import check_task, get_task
from .models import ModelError, read_model_file, save_model
from .network import NetworkConfig

LOG_FIELDS = ["epoch", "lr", "loss", "intensity", "gradient", "ssim", "val_loss", "seconds", "data_seconds"]
SCHEDULES = ("step", "cosine")


@dataclass
class TrainConfig:
    data: Path
    task: str
    out: Path
    epochs: int = 100
    batch_size: int = 4
    crop: int = 64
    lr: float = 3e-3  # with the cosine schedule: the study's choice (model card); the paper's 1e-4 under-trains on a CPU
    lr_step: int = 50
    lr_gamma: float = 0.5
    seed: int = 0
    device: str = "auto"
    resume: Path | None = None
    val_cases: list[str] = field(default_factory=list)
    crops_per_image: int = 1
    loss_weights: LossWeights | None = None  # None: the task's validated preset (Task.loss_preset)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    force: bool = False
    progress: bool = True
    threads: int | None = None
    val_every: int = 10  # full-size validation is slow on CPU; the last epoch always validates
    schedule: str = "cosine"  # "cosine": to 0 over the run (the study's choice); "step": x lr_gamma every lr_step epochs
    rotate: bool = False  # random 90-degree rotations on top of the flips
    jitter: float = 0.0  # per-modality contrast jitter (data.random_crops)
    init: Path | None = None  # start from this model's weights (fine-tuning), not from random ones
    # Pairs of other tasks to train on as well (same data root), each with the cases to leave out of
    # it: one model for all tasks, or a pre-training that per-task fine-tuning starts from.
    extra_tasks: dict[str, list[str]] = field(default_factory=dict)


def checkpoint_path(out: Path) -> Path:
    return out.with_name(out.stem + ".checkpoint.pt")


def log_path(out: Path) -> Path:
    return out.with_name(out.stem + ".log.csv")


def select_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; an unavailable 'cuda' is an error."""
    import torch

    from .backends import BackendUnavailable

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise BackendUnavailable("device 'cuda' requested but no CUDA GPU is available to torch")
    return device


def _validation_loss(model, loss_fn, mri: np.ndarray, other: np.ndarray, device: str) -> float:
    import torch

    total = 0.0
    with torch.no_grad():
        for i in range(0, len(mri), 8):
            m = torch.from_numpy(mri[i:i + 8, None]).to(device)
            o = torch.from_numpy(other[i:i + 8, None]).to(device)
            loss, _ = loss_fn(model(m, o), o, m)
            total += float(loss) * len(m)
    return total / len(mri)


def check_options(cfg: TrainConfig) -> None:
    """Refuse, before any work, options that cannot train and outputs that cannot be written: the
    model, and the checkpoint and log written beside it after every epoch."""
    out = Path(cfg.out)
    for path, what in ((out, "output"), (checkpoint_path(out), "checkpoint"), (log_path(out), "training log")):
        check_output_file(path, what)
    if out.exists() and not cfg.force and cfg.resume is None:
        raise OutputError(f"output {out} exists; pass --force to overwrite it")
    for name, value, least in (("epochs", cfg.epochs, 1), ("batch size", cfg.batch_size, 1),
                               ("crop", cfg.crop, _ssim_window(cfg)), ("crops per image", cfg.crops_per_image, 1),
                               ("val every", cfg.val_every, 1), ("seed", cfg.seed, 0), ("threads", cfg.threads or 1, 1)):
        if value < least:
            raise LightFusionError(f"{name} must be >= {least}, got {value}")
    if not cfg.lr > 0:
        raise LightFusionError(f"learning rate must be > 0, got {cfg.lr}")
    if cfg.schedule not in SCHEDULES:
        raise LightFusionError(f"schedule must be one of {', '.join(SCHEDULES)}, got {cfg.schedule!r}")
    if not 0 <= cfg.jitter < 1:
        raise LightFusionError(f"jitter must be in [0, 1), got {cfg.jitter}")
    for name in cfg.extra_tasks:
        check_task(name)


def _ssim_window(cfg: TrainConfig) -> int:
    """The SSIM loss's window: a smaller crop has no valid SSIM region."""
    return (cfg.loss_weights or LOSS_PRESETS[get_task(check_task(cfg.task)).loss_preset]).ssim_window


def lr_factor(cfg: TrainConfig, epoch: int) -> float:
    """The learning rate of epoch ``epoch`` (0-based) as a fraction of ``cfg.lr``: cosine from 1 to 0 over
    ``cfg.epochs``, or x ``lr_gamma`` every ``lr_step`` epochs. A closed form, so a run resumed with
    more epochs than it started with follows the longer run's schedule exactly."""
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(epoch, cfg.epochs) / cfg.epochs))
    return cfg.lr_gamma ** (epoch // cfg.lr_step)


def _make_scheduler(cfg: TrainConfig, optimizer):
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: lr_factor(cfg, epoch))


def load_training_images(cfg: TrainConfig, task: str) -> tuple[np.ndarray, np.ndarray, list, list]:
    """-> (train_mri, train_other, train_pairs, val_pairs): the task's pairs less its validation
    cases, plus the pairs of ``cfg.extra_tasks`` less theirs; float32 (N,H,W) in [0, 1]."""
    pairs = find_pairs(cfg.data, task)
    train_pairs, val_pairs = split_by_case(pairs, cfg.val_cases)
    for extra, held_out in cfg.extra_tasks.items():
        if extra != task:
            train_pairs += split_by_case(find_pairs(cfg.data, extra), held_out)[0]
    train_mri, train_other = to_unit(load_pairs(train_pairs))
    return train_mri, train_other, train_pairs, val_pairs


def train(cfg: TrainConfig) -> dict:
    """Train and write the model to ``cfg.out``. Returns a summary dict (epochs, seconds, losses)."""
    task = check_task(cfg.task)
    check_options(cfg)
    out = Path(cfg.out)

    import torch
    from tqdm import tqdm

    from .losses import FusionLoss
    from .network import LightFusionNet

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = select_device(cfg.device)

    train_mri, train_other, train_pairs, val_pairs = load_training_images(cfg, task)
    if cfg.crop > min(train_mri.shape[1:]):
        raise DataError(f"crop size {cfg.crop} exceeds image size {train_mri.shape[1]}x{train_mri.shape[2]}")
    val_mri = val_other = None
    if val_pairs:
        val_mri, val_other = to_unit(load_pairs(val_pairs))

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = LightFusionNet(cfg.network).to(device)
    if cfg.init is not None:
        start = read_model_file(cfg.init)
        if NetworkConfig.from_dict(start["config"]) != cfg.network:
            raise ModelError(f"{cfg.init} has another network ({start['config']}) than the one to train")
        model.load_state_dict(start["state_dict"])
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    scheduler = _make_scheduler(cfg, optimizer)
    loss_fn = FusionLoss(cfg.loss_weights or LOSS_PRESETS[get_task(task).loss_preset])
    start_epoch, history, elapsed = 0, [], 0.0

    if cfg.resume is not None:
        payload = read_model_file(cfg.resume)
        state = payload.get("training")
        if state is None:
            raise ModelError(f"{cfg.resume} is a model without training state; cannot resume from it")
        if payload["task"] != task:
            raise ModelError(f"checkpoint {cfg.resume} is for {payload['task']}, not {task}")
        model = LightFusionNet(NetworkConfig.from_dict(payload["config"])).to(device)
        model.load_state_dict(payload["state_dict"])
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
        optimizer.load_state_dict(state["optimizer"])
        scheduler = _make_scheduler(cfg, optimizer)
        scheduler.load_state_dict(state["scheduler"])
        # The lr of the next epoch from this run's schedule (its epochs may differ from the first run's)
        for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
            group["lr"] = base * lr_factor(cfg, state["epoch"])
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        start_epoch, history, elapsed = state["epoch"], state["history"], state["seconds"]
        loss_fn = FusionLoss(LossWeights(**state["loss_weights"]))

    meta = {
        "loss_weights": loss_fn.weights.to_dict(),
        "recipe": {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "crop": cfg.crop, "lr": cfg.lr,
                   "lr_step": cfg.lr_step, "lr_gamma": cfg.lr_gamma, "seed": cfg.seed,
                   "crops_per_image": cfg.crops_per_image, "schedule": cfg.schedule, "rotate": cfg.rotate,
                   "jitter": cfg.jitter, "init": str(cfg.init) if cfg.init else None,
                   "extra_tasks": {k: sorted(v) for k, v in cfg.extra_tasks.items()}},
        "train_pairs": len(train_pairs),
        "val_cases": sorted(cfg.val_cases),
        "data": str(cfg.data),
    }
    epochs = tqdm(range(start_epoch, cfg.epochs), desc=f"train {task}", unit="epoch",
                  initial=start_epoch, total=cfg.epochs, disable=not cfg.progress)
    for epoch in epochs:
        t0 = time.perf_counter()
        model.train()
        crops_m, crops_o = random_crops(train_mri, train_other, cfg.crop, rng,
                                        count=len(train_mri) * cfg.crops_per_image,
                                        rotate=cfg.rotate, jitter=cfg.jitter)
        data_seconds = time.perf_counter() - t0  # the crops of an epoch, made up front in memory
        sums = {"loss": 0.0, "intensity": 0.0, "gradient": 0.0, "ssim": 0.0}
        for i in range(0, len(crops_m), cfg.batch_size):
            m = torch.from_numpy(crops_m[i:i + cfg.batch_size]).to(device)
            o = torch.from_numpy(crops_o[i:i + cfg.batch_size]).to(device)
            loss, parts = loss_fn(model(m, o), o, m)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            n = len(m)
            sums["loss"] += loss.item() * n
            for k, v in parts.items():
                sums[k] += v.item() * n
        scheduler.step()
        row = {k: v / len(crops_m) for k, v in sums.items()}
        row["epoch"] = epoch + 1
        row["lr"] = optimizer.param_groups[0]["lr"]
        model.eval()
        validate = val_mri is not None and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs)
        row["val_loss"] = _validation_loss(model, loss_fn, val_mri, val_other, device) if validate else ""
        elapsed += time.perf_counter() - t0
        row["seconds"] = round(elapsed, 2)
        row["data_seconds"] = round(data_seconds, 3)
        history.append(row)
        epochs.set_postfix(loss=f"{row['loss']:.4f}", val=f"{row['val_loss']:.4f}" if validate else "-")
        training_state = {
            "epoch": epoch + 1, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
            "history": history, "seconds": elapsed, "loss_weights": loss_fn.weights.to_dict(),
        }
        save_model(checkpoint_path(out), model, task, meta=meta, training=training_state)
        _write_log(log_path(out), history)

    meta["epochs_trained"] = len(history)
    meta["train_seconds"] = round(elapsed, 1)
    meta["final_loss"] = history[-1]["loss"] if history else None
    save_model(out, model, task, meta=meta)
    return {"out": str(out), "epochs": len(history), "seconds": elapsed, "history": history}


def _write_log(path: Path, history: list[dict]) -> None:
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=LOG_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
