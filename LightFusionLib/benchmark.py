"""``lightfusion benchmark``: model size, FLOPs, slices/s per backend and batch size, end-to-end
volume fusion time and peak memory, with the machine named.

Speed goals are measured here (and reported in docs), never asserted by timed tests.
"""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .backends import is_installed
from .tasks import check_task


def machine_info() -> dict:
    """CPU model, logical CPUs, torch/onnxruntime versions, GPU name (if any)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    if is_installed("torch"):
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    if is_installed("onnxruntime"):
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    from .backends import gpu_name

    info["gpu"] = gpu_name()
    return info


def model_size(task: str) -> dict:
    """Parameters and MACs at 256x256 of the shipped model's architecture (needs torch)."""
    from .models import load_model
    from .network import count_macs, count_parameters

    net, _ = load_model(None, task)
    macs = count_macs(net, 256, 256)
    # The paper's "FLOPs" use the thop/ptflops convention (MACs); arithmetic FLOPs are twice that.
    return {"params": count_parameters(net), "gflops": macs / 1e9, "gmacs": macs / 1e9,
            "gflops_arithmetic": 2 * macs / 1e9}


def slices_per_second(backend, batch: int, seconds: float = 3.0, size: int = 256) -> float:
    """Steady-state throughput of ``backend`` on random (batch,size,size) planes."""
    rng = np.random.default_rng(0)
    mri = rng.random((batch, size, size), np.float32)
    other = rng.random((batch, size, size), np.float32)
    for _ in range(2):  # warm-up: allocator, graph optimisation, cuDNN autotune
        backend(mri, other)
    done, t0 = 0, time.perf_counter()
    while True:
        backend(mri, other)
        done += batch
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds and done >= 2 * batch:
            return done / elapsed


def _available_backends(backend: str, device: str) -> list[tuple[str, str]]:
    from .backends import choose_backend

    if backend != "auto":
        return [choose_backend(backend, device)]
    found = []
    for name in ("torch", "onnx"):
        for dev in (["cpu", "cuda"] if device == "auto" else [device]):
            try:
                pair = choose_backend(name, dev)
            except Exception:
                continue
            if pair not in found:
                found.append(pair)
    return found


# ``lightfusion ARGS``, then the process's own peak RSS in kB as the last line on stderr. Not
# wait4's ru_maxrss: Linux carries the parent's high-water mark into a (v)forked child, so a
# parent holding torch inflated it by hundreds of MB. VmHWM belongs to the exec-ed image alone.
_FUSE_REPORTING_PEAK = """
import atexit, resource, sys
from LightFusionLib.cli import main

def report_peak():
    try:
        with open("/proc/self/status") as f:
            kb = int(f.read().split("VmHWM:")[1].split()[0])
    except (OSError, IndexError, ValueError):  # no procfs: the inherited-mark-prone fallback
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"peak_rss_kb={kb}", file=sys.stderr)

atexit.register(report_peak)
sys.exit(main(sys.argv[1:]))
"""


def warm_stages(engine, mri_path: Path, pet_path: Path, out_path: Path, task: str) -> dict:
    """Seconds per stage of fusing a pair of files in this process with ``engine`` already loaded,
    as in Slicer from the second run on: read, prepare (resample, window), fuse (colour, planes,
    network), write, and their total."""
    from .fusion import fuse_prepared, prepare_pair
    from .volumeio import read_volume, write_volume

    times = [time.perf_counter()]
    mri, other = read_volume(mri_path), read_volume(pet_path)
    times.append(time.perf_counter())
    pair = prepare_pair(mri, other, task)
    times.append(time.perf_counter())
    fused = fuse_prepared(pair, engine)
    times.append(time.perf_counter())
    write_volume(fused, out_path)
    times.append(time.perf_counter())
    stages = {name: round(b - a, 3) for name, a, b in zip(("read", "prepare", "fuse", "write"), times, times[1:])}
    stages["total"] = round(times[-1] - times[0], 3)
    return stages


def volume_benchmark(task: str, backend: str, device: str, shape=(256, 256, 256), half: bool = False,
                     engine=None) -> dict:
    """End-to-end ``lightfusion fuse`` of a synthetic PET/MRI pair of ``shape`` (x, y, z) in a
    subprocess: wall seconds (read, resample, fuse, write; process start and model load included)
    and peak RSS; with ``engine`` (a loaded backend) also the in-process stages (:func:`warm_stages`)."""
    import SimpleITK as sitk

    with tempfile.TemporaryDirectory() as tmp:
        rng = np.random.default_rng(0)
        z, y, x = shape[2], shape[1], shape[0]
        zz, yy, xx = np.ogrid[:z, :y, :x]
        head = ((zz - z / 2) ** 2 / (z / 2.4) ** 2 + (yy - y / 2) ** 2 / (y / 2.4) ** 2
                + (xx - x / 2) ** 2 / (x / 2.6) ** 2) < 1
        texture = 400 + 200 * np.sin(xx / 7.0) * np.cos(yy / 5.0)
        mri = (head * texture + rng.normal(0, 10, (z, y, x))).astype(np.int16)  # MRIs are stored as int16
        mri_img = sitk.GetImageFromArray(mri)
        mri_img.SetSpacing((1.0, 1.0, 1.0))
        # PET on a 2 mm grid with another origin, so the run includes resampling.
        pet = sitk.Resample(sitk.Cast(mri_img, sitk.sitkFloat32), [s // 2 for s in shape], sitk.Transform(),
                            sitk.sitkLinear, (4.0, 4.0, 4.0), (2.0, 2.0, 2.0), mri_img.GetDirection())
        sitk.WriteImage(mri_img, f"{tmp}/mri.nrrd")
        sitk.WriteImage(sitk.Abs(pet), f"{tmp}/pet.nrrd")
        args = ["fuse", f"{tmp}/mri.nrrd", f"{tmp}/pet.nrrd", "-o", f"{tmp}/fused.nrrd", "--task", task,
                "--backend", backend, "--device", device, "--quiet"] + (["--half"] if half else [])
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _FUSE_REPORTING_PEAK, *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        seconds = time.perf_counter() - t0
        lines = proc.stderr.strip().splitlines()
        if proc.returncode != 0 or not lines or not lines[-1].startswith("peak_rss_kb="):
            raise RuntimeError(f"volume benchmark failed: {lines[-2:]}")
        peak_kb = int(lines[-1].split("=")[1])
        result = {"shape": list(shape), "seconds": round(seconds, 3), "peak_rss_mb": round(peak_kb / 1024, 1)}
        if engine is not None:
            result["warm"] = warm_stages(engine, Path(tmp, "mri.nrrd"), Path(tmp, "pet.nrrd"), Path(tmp, "warm.nrrd"), task)
    return result


def run_benchmark(task: str = "pet-mri", backend: str = "auto", device: str = "auto",
                  batch_sizes: list[int] | None = None, volume: bool = True, seconds: float = 3.0,
                  volume_shape: tuple[int, int, int] = (256, 256, 256), half: bool = False) -> dict:
    """Measure every available backend (or only ``backend``); with ``half``, torch on CUDA in fp16
    alone. Returns the JSON-ready report."""
    from .backends import choose_backend, load_backend

    task = check_task(task)
    batch_sizes = batch_sizes or [1, 4, 16]
    report: dict = {"task": task, "machine": machine_info(), "half": half, "backends": {}}
    if is_installed("torch"):
        report.update(model_size(task))
    best, best_device = 0.0, None
    pairs = [choose_backend("torch", "cuda")] if half else _available_backends(backend, device)
    for name, dev in pairs:
        engine = load_backend(None, task, name, dev, half=half)
        rates = {str(b): round(slices_per_second(engine, b, seconds), 2) for b in batch_sizes}
        # The GPU goal is phrased per volume: network time for 256 planes at the best batch size.
        entry = {"device": dev, "slices_per_second_by_batch": rates,
                 "network_ms_per_256_slices": round(256_000 / max(rates.values()), 1)}
        if volume:
            entry["volume"] = volume_benchmark(task, name, dev, volume_shape, half, engine)
        report["backends"][f"{name}-{dev}"] = entry
        if max(rates.values()) > best:
            best, best_device = max(rates.values()), f"{name}-{dev}"
    report["slices_per_second"] = best
    report["device"] = best_device
    return report


def format_report(report: dict) -> str:
    m = report["machine"]
    lines = [f"machine: {m['cpu']} ({m['cpus']} CPUs){', GPU ' + m['gpu'] if m.get('gpu') else ''}"]
    if "params" in report:
        lines.append(f"model {report['task']}: {report['params']} parameters, {report['gmacs']:.3f} GMACs "
                     f"(= the paper's GFLOPs) / {report['gflops_arithmetic']:.3f} GFLOPs at 256x256")
    for name, entry in report["backends"].items():
        rates = ", ".join(f"batch {b}: {r:.1f}" for b, r in entry["slices_per_second_by_batch"].items())
        lines.append(f"{name}: slices/s at 256x256: {rates}; network time for 256 slices "
                     f"{entry['network_ms_per_256_slices']:.0f} ms")
        if "volume" in entry:
            v = entry["volume"]
            lines.append(f"{name}: fuse {'x'.join(map(str, v['shape']))} volume end to end: {v['seconds']:.2f} s, "
                         f"peak memory {v['peak_rss_mb']:.0f} MB")
            if "warm" in v:
                stages = ", ".join(f"{k} {s:.2f}" for k, s in v["warm"].items() if k != "total")
                lines.append(f"{name}: same volume in process, model loaded: {v['warm']['total']:.2f} s ({stages})")
    lines.append(f"best: {report['slices_per_second']:.1f} slices/s ({report['device']})")
    return "\n".join(lines)
