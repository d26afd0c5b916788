"""``lightfusion benchmark``: model size, FLOPs, slices/s per backend and batch size, end-to-end
volume fusion time and peak memory, and where the time goes (a table of stages), with the machine
and its load named.

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


def load_average() -> float:
    """The machine's 1-minute load average (0.0 where the OS does not say): numbers measured while
    other work runs are slower, so every report carries it."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return 0.0


def machine_info() -> dict:
    """CPU model, logical CPUs, torch/onnxruntime/openvino versions, GPU name (if any), load."""
    from .backends import cpu_model

    info = {"cpu": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}
    if is_installed("torch"):
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    if is_installed("onnxruntime"):
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    if is_installed("openvino"):
        import openvino

        info["openvino"] = openvino.__version__.split("-")[0]
    from .backends import gpu_name

    info["gpu"] = gpu_name()
    info["load_1min"] = load_average()
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
    """(backend, device) pairs to measure: every installed one for 'auto' (OpenVINO included
    where installed), else the one asked for."""
    from .backends import BACKENDS, choose_backend

    if backend != "auto":
        return [choose_backend(backend, device)]
    found = []
    for name in [b for b in BACKENDS if b != "auto"]:
        for dev in (["cpu", "cuda"] if device == "auto" else [device]):
            try:
                pair = choose_backend(name, dev)
            except Exception:
                continue
            if pair not in found:
                found.append(pair)
    return found


def _load_engine(task: str, name: str, device: str, half: bool):
    from .backends import load_backend

    return load_backend(None, task, name, device, half=half)


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

# The stage table: what a warm `fuse` (model loaded, as in Slicer from the second run on) spends
# its time on. "planes" is the host side of fusing the planes (colour, cut, resample to the net grid
# and back, merge) with a stand-in network that costs nothing; "network" is the backend alone on as
# many planes of the size it is given; "fuse" is the real thing, where the two overlap (the network
# runs on its own thread, one batch behind). host = every stage but the network and fuse.
STAGES = ("read", "prepare", "checks", "planes", "network", "fuse", "write", "verify")
HOST_STAGES = ("read", "prepare", "checks", "planes", "write", "verify")


class _StandInNetwork:
    """A backend that costs nothing (returns the MRI plane), counting the planes it is given."""

    name = "stand-in"

    def __init__(self, like) -> None:
        self.preferred_batch = getattr(like, "preferred_batch", 4)
        self.task = getattr(like, "task", None)
        self.planes, self.shape = 0, None

    def __call__(self, mri: np.ndarray, other: np.ndarray) -> np.ndarray:
        self.planes += len(mri)
        self.shape = mri.shape[1:]
        return mri

    def describe(self) -> str:
        return "stand-in"


def _network_alone(engine, planes: int, shape: tuple[int, int]) -> float:
    """Seconds ``engine`` takes for ``planes`` random planes of ``shape`` at its preferred batch."""
    batch = int(getattr(engine, "preferred_batch", 4))
    rng = np.random.default_rng(0)
    mri = rng.random((batch,) + tuple(shape), np.float32)
    other = rng.random((batch,) + tuple(shape), np.float32)
    engine(mri[:1], other[:1])  # warm-up (a new plane size compiles in some runtimes)
    t0 = time.perf_counter()
    for start in range(0, planes, batch):
        n = min(batch, planes - start)
        engine(mri[:n], other[:n])
    return time.perf_counter() - t0


def warm_stages(engine, mri_path: Path, pet_path: Path, out_path: Path, task: str) -> dict:
    """Seconds per stage (:data:`STAGES`) of fusing a pair of files in this process with ``engine``
    already loaded, as in Slicer from the second run on, plus ``host`` (the stages but network and
    fuse), ``total`` (read, prepare, checks, fuse, write, verify: the warm run itself) and the
    planes sent to the network."""
    from .alignment import check_alignment
    from .fusion import fuse_prepared, prepare_pair
    from .volumeio import _read_back_problem, read_volume, write_volume

    t = {}
    t0 = time.perf_counter()
    mri, other = read_volume(mri_path), read_volume(pet_path)
    t["read"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pair = prepare_pair(mri, other, task, check_alignment=False)
    t["prepare"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    check_alignment(mri, other)  # what prepare_pair runs by default for a scalar pair
    t["checks"] = time.perf_counter() - t0
    stand_in = _StandInNetwork(engine)
    t0 = time.perf_counter()
    fuse_prepared(pair, stand_in)
    t["planes"] = time.perf_counter() - t0
    t["network"] = _network_alone(engine, stand_in.planes, stand_in.shape) if stand_in.planes else 0.0
    t0 = time.perf_counter()
    fused = fuse_prepared(pair, engine)
    t["fuse"] = time.perf_counter() - t0
    del pair
    t0 = time.perf_counter()
    write_volume(fused, out_path)  # written to a temporary, read back and compared, renamed
    written = time.perf_counter() - t0
    t0 = time.perf_counter()
    if _read_back_problem(out_path, fused) is not None:  # the read-back alone, timed again
        raise RuntimeError("the benchmark's fused volume did not read back")
    t["verify"] = time.perf_counter() - t0
    t["write"] = max(0.0, written - t["verify"])
    stages = {name: round(t[name], 3) for name in STAGES}
    stages["host"] = round(sum(t[name] for name in HOST_STAGES), 3)
    stages["total"] = round(sum(t[name] for name in STAGES if name not in ("planes", "network")), 3)
    stages["network_planes"] = stand_in.planes
    stages["network_plane_size"] = list(stand_in.shape) if stand_in.shape else None
    return stages


def synthetic_pair(shape: tuple[int, int, int], folder: Path) -> tuple[Path, Path]:
    """An int16 MRI of ``shape`` (x, y, z) voxels of 1 mm (an ellipsoid 'head' with texture and
    noise) and a float PET on a 2 mm grid with another origin (so a fuse resamples it), written to
    ``folder`` as mri.nrrd and pet.nrrd. Built slab by slab: 512x512x400 needs about 0.5 GB here."""
    import SimpleITK as sitk

    x, y, z = shape
    rng = np.random.default_rng(0)
    yy, xx = np.ogrid[:y, :x]
    texture = (400 + 200 * np.sin(xx / 7.0) * np.cos(yy / 5.0)).astype(np.float32)
    mri = np.empty((z, y, x), np.int16)
    for k0 in range(0, z, 32):
        zz = np.arange(k0, min(z, k0 + 32))[:, None, None]
        head = ((zz - z / 2) ** 2 / (z / 2.4) ** 2 + (yy - y / 2) ** 2 / (y / 2.4) ** 2
                + (xx - x / 2) ** 2 / (x / 2.6) ** 2) < 1
        noise = rng.standard_normal((len(zz), y, x), np.float32) * 10
        mri[k0:k0 + len(zz)] = head * texture + noise
    mri_img = sitk.GetImageFromArray(mri)  # MRIs are stored as int16
    del mri
    mri_img.SetSpacing((1.0, 1.0, 1.0))
    pet = sitk.Resample(mri_img, [s // 2 for s in shape], sitk.Transform(), sitk.sitkLinear, (4.0, 4.0, 4.0),
                        (2.0, 2.0, 2.0), mri_img.GetDirection(), 0.0, sitk.sitkFloat32)
    paths = folder / "mri.nrrd", folder / "pet.nrrd"
    sitk.WriteImage(mri_img, str(paths[0]))
    sitk.WriteImage(sitk.Abs(pet), str(paths[1]))
    return paths


def volume_benchmark(task: str, backend: str, device: str, shape=(256, 256, 256), half: bool = False,
                     engine=None) -> dict:
    """End-to-end ``lightfusion fuse`` of a synthetic PET/MRI pair of ``shape`` (x, y, z) in a
    subprocess: wall seconds (read, resample, fuse, write; process start and model load included)
    and peak RSS; with ``engine`` (a loaded backend) also the in-process stages (:func:`warm_stages`),
    as ``stages`` and, summed the way earlier reports had them, ``warm``."""
    with tempfile.TemporaryDirectory() as tmp:
        mri_path, pet_path = synthetic_pair(tuple(shape), Path(tmp))
        result = {"shape": list(shape), "seconds": None, "peak_rss_mb": None, "load_1min_before": load_average()}
        args = ["fuse", str(mri_path), str(pet_path), "-o", f"{tmp}/fused.nrrd", "--task", task,
                "--backend", backend, "--device", device, "--quiet"] + (["--half"] if half else [])
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _FUSE_REPORTING_PEAK, *args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
        seconds = time.perf_counter() - t0
        lines = proc.stderr.strip().splitlines()
        if proc.returncode != 0 or not lines or not lines[-1].startswith("peak_rss_kb="):
            raise RuntimeError(f"volume benchmark failed: {lines[-2:]}")
        result["seconds"] = round(seconds, 3)
        result["peak_rss_mb"] = round(int(lines[-1].split("=")[1]) / 1024, 1)
        if engine is not None:
            stages = warm_stages(engine, mri_path, pet_path, Path(tmp, "warm.nrrd"), task)
            result["stages"] = stages
            result["warm"] = {"read": stages["read"], "prepare": round(stages["prepare"] + stages["checks"], 3),
                              "fuse": stages["fuse"], "write": round(stages["write"] + stages["verify"], 3)}
            result["warm"]["total"] = round(sum(result["warm"].values()), 3)
        result["load_1min_after"] = load_average()
    return result


def run_benchmark(task: str = "pet-mri", backend: str = "auto", device: str = "auto",
                  batch_sizes: list[int] | None = None, volume: bool = True, seconds: float = 3.0,
                  volume_shape: tuple[int, int, int] | list[tuple[int, int, int]] = (256, 256, 256),
                  half: bool = False) -> dict:
    """Measure every available backend (or only ``backend``); with ``half``, torch on CUDA in fp16
    alone. ``volume_shape``: one (x, y, z) or a list of them (e.g. 256^3 and 512x512x400), each
    fused end to end and stage by stage. Returns the JSON-ready report."""
    from .backends import choose_backend

    task = check_task(task)
    batch_sizes = batch_sizes or [1, 4, 16]
    shapes = [tuple(volume_shape)] if np.ndim(volume_shape[0]) == 0 else [tuple(s) for s in volume_shape]
    report: dict = {"task": task, "machine": machine_info(), "half": half, "backends": {}}
    if is_installed("torch"):
        report.update(model_size(task))
    best, best_device = 0.0, None
    pairs = [choose_backend("torch", "cuda")] if half else _available_backends(backend, device)
    for name, dev in pairs:
        engine = _load_engine(task, name, dev, half)
        load = load_average()
        rates = {str(b): round(slices_per_second(engine, b, seconds), 2) for b in batch_sizes}
        # The GPU goal is phrased per volume: network time for 256 planes at the best batch size.
        entry = {"device": dev, "describe": engine.describe(), "slices_per_second_by_batch": rates,
                 "network_ms_per_256_slices": round(256_000 / max(rates.values()), 1),
                 "load_1min_before": load, "load_1min_after": load_average()}
        if volume:
            volumes = [volume_benchmark(task, name, dev, s, half, engine) for s in shapes]
            entry["volume"] = volumes[0]
            if len(volumes) > 1:
                entry["volumes"] = volumes
        report["backends"][f"{name}-{dev}"] = entry
        if max(rates.values()) > best:
            best, best_device = max(rates.values()), f"{name}-{dev}"
    report["slices_per_second"] = best
    report["device"] = best_device
    report["machine"]["load_1min_after"] = load_average()
    return report


def format_stages(volume: dict) -> str:
    """One line of the stage table for a volume entry of the report."""
    s = volume["stages"]
    parts = ", ".join(f"{k} {s[k]:.2f}" for k in STAGES)
    return (f"stages (s, model loaded): {parts}; host {s['host']:.2f} vs network {s['network']:.2f} "
            f"({s['network_planes']} planes at {'x'.join(map(str, s['network_plane_size'] or []))}); "
            f"in process {s['total']:.2f}")


def format_report(report: dict) -> str:
    m = report["machine"]
    lines = [f"machine: {m['cpu']} ({m['cpus']} CPUs){', GPU ' + m['gpu'] if m.get('gpu') else ''}; "
             f"load (1 min) {m.get('load_1min', '?')} at the start, {m.get('load_1min_after', '?')} at the end"]
    if "params" in report:
        lines.append(f"model {report['task']}: {report['params']} parameters, {report['gmacs']:.3f} GMACs "
                     f"(= the paper's GFLOPs) / {report['gflops_arithmetic']:.3f} GFLOPs at 256x256")
    for name, entry in report["backends"].items():
        rates = ", ".join(f"batch {b}: {r:.1f}" for b, r in entry["slices_per_second_by_batch"].items())
        lines.append(f"{name}: slices/s at 256x256: {rates}; network time for 256 slices "
                     f"{entry['network_ms_per_256_slices']:.0f} ms (load {entry.get('load_1min_before', '?')})")
        for v in entry.get("volumes", [entry["volume"]] if "volume" in entry else []):
            size = "x".join(map(str, v["shape"]))
            if v.get("seconds") is not None:
                lines.append(f"{name}: fuse {size} volume end to end: {v['seconds']:.2f} s, peak memory "
                             f"{v['peak_rss_mb']:.0f} MB (load {v.get('load_1min_before', '?')})")
            if "stages" in v:
                lines.append(f"{name}: {size}: {format_stages(v)}")
    lines.append(f"best: {report['slices_per_second']:.1f} slices/s ({report['device']})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# `lightfusion batch`: cohort throughput against sequential `lightfusion fuse` processes, and
# worker memory over many cases (``lightfusion benchmark --batch-cases N``)
# ----------------------------------------------------------------------------------------------
def _run_lightfusion(args: list[str], peak: bool = False) -> tuple[float, int | None]:
    """Wall seconds of one ``lightfusion ARGS`` process (and its own peak RSS in kB with ``peak``)."""
    command = [sys.executable, "-c", _FUSE_REPORTING_PEAK, *args] if peak else [sys.executable, "-m", "LightFusionLib", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    lines = proc.stderr.strip().splitlines()
    if proc.returncode != 0:
        raise RuntimeError(f"lightfusion {args[0]} failed ({proc.returncode}): {lines[-2:]}")
    kb = int(lines[-1].split("=")[1]) if peak and lines and lines[-1].startswith("peak_rss_kb=") else None
    return seconds, kb


def _small_pair(shape: tuple[int, int, int], seed: int):
    """A small synthetic int16 MRI and float PET (2 mm, a hot spot that moves with ``seed``)."""
    import SimpleITK as sitk

    rng = np.random.default_rng(seed)
    z, y, x = shape[2], shape[1], shape[0]
    zz, yy, xx = np.ogrid[:z, :y, :x]
    head = ((zz - z / 2) ** 2 / (z / 2.4) ** 2 + (yy - y / 2) ** 2 / (y / 2.4) ** 2 + (xx - x / 2) ** 2 / (x / 2.6) ** 2) < 1
    mri = (head * (400 + 200 * np.sin(xx / 3.0) * np.cos(yy / 2.5)) + rng.normal(0, 10, (z, y, x))).astype(np.int16)
    hot = np.exp(-((zz - z / 2 - seed % 5) ** 2 + (yy - y / 3) ** 2 + (xx - x / 2) ** 2) / 20)
    pet = (head * (1 + 5 * hot) + rng.random((z, y, x)) * 0.1).astype(np.float32)
    images = [sitk.GetImageFromArray(mri), sitk.GetImageFromArray(pet)]
    for image in images:
        image.SetSpacing((2.0, 2.0, 2.0))
    return images


def _memory_trend(rows: list[dict]) -> dict:
    """Per worker process: resident memory after its first cases and after its last, and the fitted
    growth per 100 cases after its first 10 (start-up allocations settle there)."""
    per_worker: dict[str, list[float]] = {}
    for row in rows:  # plan order = dispatch order
        if row.get("rss_mb") is not None:
            per_worker.setdefault(row["worker"], []).append(row["rss_mb"])
    trend = {}
    for worker, rss in per_worker.items():
        settled = np.array(rss[10:] if len(rss) > 20 else rss, np.float64)
        slope = float(np.polyfit(np.arange(len(settled)), settled, 1)[0]) * 100 if len(settled) > 2 else None
        trend[worker] = {"cases": len(rss), "rss_after_10_cases_mb": rss[min(9, len(rss) - 1)],
                         "rss_last_mb": rss[-1], "rss_max_mb": max(rss),
                         "growth_after_10_cases_mb": round(rss[-1] - rss[min(9, len(rss) - 1)], 1),
                         "fitted_mb_per_100_cases": round(slope, 2) if slope is not None else None}
    return trend


def batch_benchmark(cases: int = 16, workers: int = 2, backend: str = "auto", device: str = "auto",
                    memory_cases: int = 200, memory_shape: tuple[int, int, int] = (32, 32, 32)) -> dict:
    """``lightfusion batch`` measured the way a user runs it, each command a fresh process:

    - throughput: ``cases`` copies of the bundled sample pair fused by ``cases`` sequential
      ``lightfusion fuse`` processes, against one ``lightfusion batch --workers N --no-montage`` (the
      same outputs), a ``--workers 1`` batch, and a batch with montages and the report;
    - memory: ``memory_cases`` small synthetic cases (``memory_shape``) in one ``--workers N`` batch with
      montages and the report; each worker's resident memory after every case (from summary.json)
      and the batch process's own peak.
    """
    import json
    import shutil

    import SimpleITK as sitk

    from .demo import sample_paths

    report: dict = {"machine": machine_info(), "load_1min_before": round(os.getloadavg()[0], 2),
                    "backend": backend, "device": device, "workers": workers}
    common = ["--backend", backend, "--device", device, "--quiet"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        mri, pet = sample_paths()
        (root / "in").mkdir()
        rows = ["id,mri,other"]
        for i in range(cases):  # distinct files, as in a real cohort
            shutil.copy(mri, root / "in" / f"s{i:03d}_mri.nrrd")
            shutil.copy(pet, root / "in" / f"s{i:03d}_pet.nrrd")
            rows.append(f"s{i:03d},in/s{i:03d}_mri.nrrd,in/s{i:03d}_pet.nrrd")
        (root / "cohort.csv").write_text("\n".join(rows) + "\n")
        _run_lightfusion(["fuse", str(mri), str(pet), "-o", str(root / "warm.nrrd"), *common])  # warm caches, untimed
        (root / "fuse").mkdir()
        sequential = sum(_run_lightfusion(["fuse", str(root / "in" / f"s{i:03d}_mri.nrrd"),
                                           str(root / "in" / f"s{i:03d}_pet.nrrd"),
                                           "-o", str(root / "fuse" / f"s{i:03d}.nrrd"), *common])[0]
                         for i in range(cases))
        batch, _ = _run_lightfusion(["batch", str(root / "cohort.csv"), "--out", str(root / "batch"), "--workers",
                                     str(workers), "--no-montage", *common])
        one, _ = _run_lightfusion(["batch", str(root / "cohort.csv"), "--out", str(root / "batch1"), "--no-montage",
                                   *common])
        review, _ = _run_lightfusion(["batch", str(root / "cohort.csv"), "--out", str(root / "review"), "--workers",
                                      str(workers), *common])
        same = all(np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(root / "fuse" / f"s{i:03d}.nrrd"))),
                                  sitk.GetArrayFromImage(sitk.ReadImage(str(root / "batch" / f"s{i:03d}" / "fused.nrrd"))))
                   for i in range(cases))
        report["throughput"] = {
            "cases": cases, "sequential_fuse_seconds": round(sequential, 2),
            "batch_seconds": round(batch, 2), "speedup": round(sequential / batch, 2),
            "batch_1_worker_seconds": round(one, 2), "speedup_1_worker": round(sequential / one, 2),
            "batch_with_montage_and_report_seconds": round(review, 2),
            "speedup_with_montage_and_report": round(sequential / review, 2), "outputs_identical": same}
        if memory_cases > 0:
            (root / "small").mkdir()
            for seed in range(4):
                m, p = _small_pair(memory_shape, seed)
                sitk.WriteImage(m, str(root / "small" / f"m{seed}.nrrd"))
                sitk.WriteImage(p, str(root / "small" / f"p{seed}.nrrd"))
            lines = ["id,mri,other"] + [f"c{i:04d},small/m{i % 4}.nrrd,small/p{i % 4}.nrrd" for i in range(memory_cases)]
            (root / "small.csv").write_text("\n".join(lines) + "\n")
            seconds, peak_kb = _run_lightfusion(["batch", str(root / "small.csv"), "--out", str(root / "small-out"),
                                                 "--workers", str(workers), *common], peak=True)
            summary = json.loads((root / "small-out" / "summary.json").read_text())
            report["memory"] = {"cases": memory_cases, "shape": list(memory_shape), "seconds": round(seconds, 2),
                                "failed": summary["totals"]["failed"],
                                "batch_process_peak_mb": round(peak_kb / 1024, 1) if peak_kb else None,
                                "workers": _memory_trend(summary["cases"])}
    report["load_1min_after"] = round(os.getloadavg()[0], 2)
    return report


def format_batch_report(report: dict) -> str:
    m, t = report["machine"], report["throughput"]
    lines = [f"machine: {m['cpu']} ({m['cpus']} CPUs); load (1 min) {report['load_1min_before']} before, "
             f"{report['load_1min_after']} after; backend {report['backend']} on {report['device']}",
             f"{t['cases']} sample pairs: {t['cases']} sequential `lightfusion fuse` {t['sequential_fuse_seconds']:.1f} s; "
             f"`lightfusion batch --workers {report['workers']} --no-montage` {t['batch_seconds']:.1f} s "
             f"({t['speedup']:.2f}x; outputs identical: {t['outputs_identical']})",
             f"  --workers 1: {t['batch_1_worker_seconds']:.1f} s ({t['speedup_1_worker']:.2f}x); with montages and "
             f"report: {t['batch_with_montage_and_report_seconds']:.1f} s ({t['speedup_with_montage_and_report']:.2f}x)"]
    if "memory" in report:
        mem = report["memory"]
        lines.append(f"{mem['cases']} small cases ({'x'.join(map(str, mem['shape']))}, montages and report) in "
                     f"{mem['seconds']:.1f} s, {mem['failed']} failed; batch process peak {mem['batch_process_peak_mb']} MB")
        for worker, w in mem["workers"].items():
            lines.append(f"  worker {worker}: {w['cases']} cases, RSS {w['rss_after_10_cases_mb']} MB after 10, "
                         f"{w['rss_last_mb']} MB after the last (max {w['rss_max_mb']}); fitted "
                         f"{w['fitted_mb_per_100_cases']} MB per 100 cases")
    return "\n".join(lines)
