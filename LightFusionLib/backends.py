"""Inference backends behind one interface: torch (CPU/CUDA), ONNX Runtime (CPU, CUDA provider)
and OpenVINO's runtime (CPU; an optional extra).

A backend fuses batches of planes: ``backend(mri, other)`` with two (N,H,W) float32 arrays in
[0, 1] returns the fused luma (N,H,W) float32 in [0, 1]. torch, onnxruntime and openvino are
imported only when a backend that needs them is made, so inference works with any one installed.

``auto`` on a CPU runs the exported ``.onnx`` model on whichever of ONNX Runtime and OpenVINO is
faster on this machine (:func:`faster_cpu_runtime`: measured once, then remembered): OpenVINO was
1.45-1.6x ONNX Runtime on an AVX-512 Xeon and 1.0-1.45x on an AVX2 EPYC, with the same planes to
0.0002 grey levels.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import platform
import time
from pathlib import Path

import numpy as np

from .errors import LightFusionError
from .models import ModelError, resolve_model_path, shipped_model_path
from .tasks import check_task

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx", "openvino")
# The Python package each concrete backend imports (what to install for it).
BACKEND_PACKAGES = {"torch": "torch", "onnx": "onnxruntime", "openvino": "openvino"}
DEVICES = ("auto", "cpu", "cuda")
CPU_RUNTIMES = ("onnx", "openvino")  # the backends that run an exported .onnx model on the CPU
# OpenVINO is chosen by 'auto' when it runs at least this many times ONNX Runtime's planes/s here:
# a margin over the measurement's noise, so that the choice does not flip between two equal runtimes.
OPENVINO_MARGIN = 1.1


class BackendOutOfMemory(RuntimeError):
    """The device ran out of memory for this batch; the caller may retry with a smaller one."""


class BackendUnavailable(LightFusionError):
    """The requested backend or device is not installed / not present."""


def is_installed(module: str) -> bool:
    """Is ``module`` importable? (Without importing it: torch alone takes seconds to import.)"""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # blocked, or a None placeholder in sys.modules
        return False


def cuda_driver_present() -> bool:
    """Is an NVIDIA driver installed at all (its kernel module on Linux, its CUDA library)? Without
    one no runtime can see a CUDA GPU; asking torch costs its import, about 1.3 s on a CPU machine."""
    import ctypes.util
    import sys

    if sys.platform.startswith("linux") and Path("/proc/driver/nvidia/version").exists():
        return True
    if sys.platform == "darwin":
        return False
    return ctypes.util.find_library("nvcuda" if sys.platform == "win32" else "cuda") is not None


def cuda_available() -> bool:
    """True when torch sees a CUDA GPU (False when torch is not installed or there is no NVIDIA driver)."""
    if not is_installed("torch") or not cuda_driver_present():
        return False
    import torch

    return torch.cuda.is_available()


def gpu_name() -> str | None:
    """Name of the first CUDA GPU, or None."""
    if not cuda_available():
        return None
    import torch

    return torch.cuda.get_device_name(0)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else what the platform says)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _runtime_choices_file() -> Path:
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "lightfusion" / "cpu-runtime.json"


def measure_cpu_runtimes(model_path: str | Path, task: str = "pet-mri", planes: int = 8,
                         rounds: int = 3) -> dict[str, float]:
    """Planes/s of ONNX Runtime and OpenVINO on ``model_path`` (an exported model of ``task``), 256x256
    random planes at each backend's preferred batch, ``rounds`` alternating rounds of ``planes``
    planes, the best round of each (about a second in all)."""
    engines = {"onnx": OnnxBackend(task, Path(model_path)), "openvino": OpenVinoBackend(task, Path(model_path))}
    rng = np.random.default_rng(0)
    mri, other = rng.random((2, planes, 256, 256), np.float32)
    best = dict.fromkeys(engines, 0.0)
    for engine in engines.values():
        engine(mri[:1], other[:1])  # warm-up: OpenVINO compiles for the plane size
    for _ in range(rounds):
        for name, engine in engines.items():
            step = int(engine.preferred_batch)
            t0 = time.perf_counter()
            for start in range(0, planes, step):
                engine(mri[start:start + step], other[start:start + step])
            best[name] = max(best[name], planes / (time.perf_counter() - t0))
    return {name: round(rate, 1) for name, rate in best.items()}


def faster_cpu_runtime() -> str:
    """'openvino' or 'onnx': the runtime ``auto`` uses on the CPU. Both installed: OpenVINO when it
    runs the shipped model at least :data:`OPENVINO_MARGIN` times as fast as ONNX Runtime, measured
    once per CPU, core count and runtime versions (:func:`measure_cpu_runtimes`) and remembered in
    ``$XDG_CACHE_HOME/lightfusion/cpu-runtime.json``. One of them installed: that one."""
    has_ort, has_ov = is_installed("onnxruntime"), is_installed("openvino")
    if not (has_ort and has_ov):
        return "openvino" if has_ov else "onnx"
    import onnxruntime
    import openvino

    key = f"{cpu_model()} | {os.cpu_count()} cpus | onnxruntime {onnxruntime.__version__} | openvino {openvino.__version__}"
    path = _runtime_choices_file()
    try:
        known = json.loads(path.read_text())
        if known.get(key, {}).get("choice") in CPU_RUNTIMES:
            return known[key]["choice"]
    except (OSError, ValueError, AttributeError):
        known = {}
    try:
        model = shipped_model_path("pet-mri", ".onnx")
    except ModelError:  # no exported model to measure with: the default runtime
        return "onnx"
    try:
        rates = measure_cpu_runtimes(model)
    except Exception as exc:  # an OpenVINO that does not run here must not take 'auto' down with it
        log.warning("OpenVINO could not be measured (%s); auto uses ONNX Runtime", str(exc).splitlines()[0])
        return "onnx"
    choice = "openvino" if rates["openvino"] >= OPENVINO_MARGIN * rates["onnx"] else "onnx"
    log.info("CPU runtime for 'auto': %s (planes/s at 256x256: ONNX Runtime %.1f, OpenVINO %.1f)",
             choice, rates["onnx"], rates["openvino"])
    known = known if isinstance(known, dict) else {}
    known[key] = {"choice": choice, "planes_per_second": rates}
    try:  # a read-only home only means measuring again next time
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, path)
    except OSError as exc:
        log.info("could not remember the CPU runtime choice in %s: %s", path, exc)
    return choice


def choose_backend(backend: str = "auto", device: str = "auto") -> tuple[str, str]:
    """Resolve (:data:`BACKENDS`, :data:`DEVICES`) to a concrete (backend, device).

    auto: torch on CUDA when a GPU is there; else the faster of ONNX Runtime and OpenVINO on the
    CPU (:func:`faster_cpu_runtime`) when one is installed; else torch on the CPU.
    """
    if backend not in BACKENDS:
        raise LightFusionError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if device not in DEVICES:
        raise LightFusionError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    has_torch, has_ort, has_ov = (is_installed(BACKEND_PACKAGES[b]) for b in ("torch", "onnx", "openvino"))
    if backend == "auto":
        if device in ("auto", "cuda") and cuda_available():
            backend = "torch"
        elif (has_ort or has_ov) and device != "cuda":
            backend = faster_cpu_runtime()
        elif has_torch:
            backend = "torch"
        elif has_ort:
            backend = "onnx"
        else:
            raise BackendUnavailable("neither torch nor onnxruntime is installed; install one of them")
    if backend == "openvino":
        if not has_ov:
            raise BackendUnavailable("backend 'openvino' requested but openvino is not installed "
                                     "(pip install openvino, or the lightfusion[openvino] extra)")
        if device == "cuda":
            raise BackendUnavailable("the openvino backend runs on the CPU, not on cuda")
        return backend, "cpu"
    if backend == "torch":
        if not has_torch:
            raise BackendUnavailable("backend 'torch' requested but torch is not installed")
        if device == "auto":
            device = "cuda" if cuda_available() else "cpu"
        elif device == "cuda" and not cuda_available():
            raise BackendUnavailable("device 'cuda' requested but no CUDA GPU is available to torch")
    else:
        if not has_ort:
            raise BackendUnavailable("backend 'onnx' requested but onnxruntime is not installed")
        import onnxruntime as ort

        has_cuda_ep = "CUDAExecutionProvider" in ort.get_available_providers()
        if device == "auto":
            device = "cuda" if has_cuda_ep else "cpu"
        elif device == "cuda" and not has_cuda_ep:
            raise BackendUnavailable("device 'cuda' requested but onnxruntime has no CUDA provider")
    return backend, device


class FusionBackend:
    """Common interface. Attributes: name ('torch'|'onnx'), device, task, model_path, preferred_batch."""

    name = "base"
    preferred_batch = 8

    def __init__(self, task: str, model_path: Path, device: str) -> None:
        self.task, self.model_path, self.device = task, model_path, device

    def __call__(self, mri: np.ndarray, other: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name} on {self.device}"


class TorchBackend(FusionBackend):
    """PyTorch eager inference (inference_mode, channels_last; fp16 on CUDA when ``half``).

    fp16 stays within 1 grey level of fp32 (0-255 output): on 48 training pairs of each task the
    largest difference was 0.66 (PET), 0.43 (SPECT) and 1.00 (CT), 4% of pixels rounding one
    level apart. bf16 is not offered: up to 6 grey levels off.
    """

    name = "torch"

    def __init__(self, task: str, model_path: Path, device: str = "cpu", half: bool = False,
                 threads: int | None = None) -> None:
        import torch

        from .models import load_model

        if half and not device.startswith("cuda"):
            raise BackendUnavailable(f"half precision runs on the torch backend on a CUDA GPU, not on {device} "
                                     "(torch emulates fp16 on a CPU, 40x slower)")
        super().__init__(task, model_path, device)
        net, self.payload = load_model(model_path, task)
        if threads:
            torch.set_num_threads(threads)
        self.half = half
        self.net = net.to(device, memory_format=torch.channels_last)
        if self.half:
            self.net = self.net.half()
        self.preferred_batch = 32 if device.startswith("cuda") else 4

    def __call__(self, mri: np.ndarray, other: np.ndarray) -> np.ndarray:
        import torch

        dtype = torch.float16 if self.half else torch.float32
        try:
            with torch.inference_mode():
                m = torch.from_numpy(np.ascontiguousarray(mri, np.float32)[:, None])
                o = torch.from_numpy(np.ascontiguousarray(other, np.float32)[:, None])
                if self.device != "cpu":
                    m = m.pin_memory().to(self.device, non_blocking=True)
                    o = o.pin_memory().to(self.device, non_blocking=True)
                m = m.to(dtype=dtype, memory_format=torch.channels_last)
                o = o.to(dtype=dtype, memory_format=torch.channels_last)
                fused = self.net(m, o)[:, 0].float()
                return fused.cpu().numpy()
        except torch.cuda.OutOfMemoryError as exc:
            torch.cuda.empty_cache()
            raise BackendOutOfMemory(str(exc).splitlines()[0]) from None


class OnnxBackend(FusionBackend):
    """ONNX Runtime inference of an exported model (see :mod:`LightFusionLib.onnx_export`).

    On CPU, one plane per run and the planes of a call spread over ``threads`` worker threads,
    each running single-threaded: a 256x256 plane's activations (16 channels, 4 MB a map) stay in
    the core's cache, and no intra-op synchronisation is paid on the many small operators.
    Measured on 2 cores (AMD EPYC, Zen 4): 134 planes/s, against 125 with 2 intra-op threads at
    batch 1 and 93 at batch 4.
    """

    name = "onnx"

    def __init__(self, task: str, model_path: Path, device: str = "cpu", threads: int | None = None) -> None:
        import onnxruntime as ort

        super().__init__(task, model_path, device)
        self.workers = max(1, threads or os.cpu_count() or 1) if device == "cpu" else 1
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = 1 if device == "cpu" else 0
        opts.inter_op_num_threads = 1
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(model_path), opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise ModelError(f"ONNX model {model_path} does not load: {str(exc).splitlines()[0]}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("lightfusion_task") and meta["lightfusion_task"] != task:
            raise ModelError(f"model {model_path} was trained for {meta['lightfusion_task']}, not {task}")
        self._pool = None
        self.preferred_batch = 2 * self.workers if device == "cpu" else 32

    def _run(self, mri: np.ndarray, other: np.ndarray) -> np.ndarray:
        try:
            return self.session.run(["fused"], {"mri": mri, "other": other})[0][:, 0]
        except Exception as exc:
            if "out of memory" in str(exc).lower() or "Failed to allocate" in str(exc):
                raise BackendOutOfMemory(str(exc).splitlines()[0]) from None
            raise

    def __call__(self, mri: np.ndarray, other: np.ndarray) -> np.ndarray:
        mri = np.ascontiguousarray(mri, np.float32)[:, None]
        other = np.ascontiguousarray(other, np.float32)[:, None]
        if self.workers == 1 or len(mri) == 1:
            return self._run(mri, other)
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="lightfusion-onnx")
        # session.run releases the GIL and is safe to call from several threads at once.
        parts = self._pool.map(lambda i: self._run(mri[i:i + 1], other[i:i + 1]), range(len(mri)))
        return np.concatenate(list(parts))


def onnx_metadata(path: str | Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file (key -> value), read from its protobuf without the
    onnx package: top-level field 14 of ModelProto, each entry a (key = 1, value = 2) message."""
    data = Path(path).read_bytes()

    def varint(pos: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            byte = data[pos]
            value |= (byte & 0x7F) << shift
            pos += 1
            if byte < 0x80:
                return value, pos
            shift += 7

    def fields(start: int, stop: int):
        pos = start
        while pos < stop:
            tag, pos = varint(pos)
            number, wire = tag >> 3, tag & 7
            if wire == 0:
                value, pos = varint(pos)
                yield number, value
            elif wire == 2:
                length, pos = varint(pos)
                yield number, (pos, pos + length)
                pos += length
            elif wire in (1, 5):
                pos += 8 if wire == 1 else 4
            else:
                raise ValueError(f"unexpected protobuf wire type {wire}")

    meta = {}
    try:
        for number, span in fields(0, len(data)):
            if number == 14 and isinstance(span, tuple):
                entry = {n: data[a:b].decode("utf-8", "replace") for n, (a, b) in fields(*span) if n in (1, 2)}
                meta[entry.get(1, "")] = entry.get(2, "")
    except (IndexError, ValueError):
        return {}  # not a protobuf we can walk: no metadata; the runtime will say what is wrong
    return meta


class OpenVinoBackend(FusionBackend):
    """OpenVINO runtime inference of an exported ONNX model, on the CPU, in fp32 (``--backend
    openvino``; ``auto`` picks it where it is the faster CPU runtime, :func:`faster_cpu_runtime`;
    the optional ``openvino`` extra).

    The model is compiled once per plane size with static shapes (batch 1); the planes of a call
    run as asynchronous requests (two per stream) on ``threads`` single-threaded streams, as
    :class:`OnnxBackend` spreads them over single-threaded workers. The precision is pinned to f32:
    on CPUs with bf16 units OpenVINO would otherwise infer in bf16 (up to 6 grey levels off).

    Measured on 2-core test machines (OpenVINO 2026.4, ONNX Runtime 1.32), within 0.0002 grey
    levels of ONNX Runtime: on an Intel Xeon (Ice Lake, AVX-512) 94 / 98 planes/s at batch 4 / 16
    against ONNX Runtime's 58 / 67 (1.6x / 1.45x); on an AMD EPYC (Zen 3, AVX2) 1.15x to 1.45x,
    once 0.97x.
    """

    name = "openvino"

    def __init__(self, task: str, model_path: Path, device: str = "cpu", threads: int | None = None) -> None:
        import openvino as ov

        if device != "cpu":
            raise BackendUnavailable(f"the openvino backend runs on the CPU, not on {device}")
        super().__init__(task, model_path, device)
        self.streams = max(1, threads or os.cpu_count() or 1)
        meta = onnx_metadata(model_path)
        if meta.get("lightfusion_task") and meta["lightfusion_task"] != task:
            raise ModelError(f"model {model_path} was trained for {meta['lightfusion_task']}, not {task}")
        self._core = ov.Core()
        try:
            self._model = self._core.read_model(str(model_path))
        except Exception as exc:
            raise ModelError(f"ONNX model {model_path} does not load in OpenVINO: {str(exc).splitlines()[0]}") from None
        self._compiled: dict[tuple[int, int], object] = {}
        self.preferred_batch = 2 * self.streams

    def _queue(self, h: int, w: int):
        if (h, w) not in self._compiled:
            import openvino as ov

            model = self._model.clone()
            model.reshape({"mri": [1, 1, h, w], "other": [1, 1, h, w]})
            compiled = self._core.compile_model(model, "CPU", {
                "INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": self.streams,
                "INFERENCE_NUM_THREADS": self.streams, "PERFORMANCE_HINT": "THROUGHPUT"})
            self._compiled[(h, w)] = ov.AsyncInferQueue(compiled, 2 * self.streams)
        return self._compiled[(h, w)]

    def __call__(self, mri: np.ndarray, other: np.ndarray) -> np.ndarray:
        mri = np.ascontiguousarray(mri, np.float32)[:, None]
        other = np.ascontiguousarray(other, np.float32)[:, None]
        out = np.empty((len(mri),) + mri.shape[2:], np.float32)
        queue = self._queue(*mri.shape[2:])

        def done(request, k: int) -> None:
            out[k] = request.get_output_tensor(0).data[0, 0]

        queue.set_callback(done)
        for k in range(len(mri)):
            queue.start_async({"mri": mri[k:k + 1], "other": other[k:k + 1]}, userdata=k)
        queue.wait_all()
        return out


def load_backend(model: str | Path | None = None, task: str = "pet-mri", backend: str = "auto",
                 device: str = "auto", half: bool = False, **options) -> FusionBackend:
    """Make a backend for ``task``'s shipped model or the model file ``model``.

    A ``.onnx`` model runs on ONNX Runtime or OpenVINO (``auto``: ONNX Runtime on a CUDA GPU, else
    the faster CPU runtime); a ``.pt`` model with backend 'onnx' or 'openvino' is refused (export
    it first with ``lightfusion export-onnx``). ``half``: fp16 inference, offered for
    torch on CUDA (see :class:`TorchBackend`).
    """
    task = check_task(task)
    onnx_file = model is not None and Path(model).suffix.lower() == ".onnx"
    if onnx_file and backend == "torch":
        raise ModelError(f"model {model} is an .onnx model: it runs on the onnx or openvino backend, not torch")
    if onnx_file and backend == "auto":  # an exported model: ONNX Runtime on a GPU it can use, else the faster CPU runtime
        on_gpu = device != "cpu" and is_installed("onnxruntime") and choose_backend("onnx", device)[1] == "cuda"
        backend = "onnx" if on_gpu else faster_cpu_runtime()
    if model is not None and not onnx_file and backend == "auto":
        backend = "torch" if is_installed("torch") else backend
    name, dev = choose_backend(backend, device)
    if name in CPU_RUNTIMES and backend == "auto" and model is None and is_installed("torch"):
        # 'auto' prefers a CPU runtime on the CPU, but only where the task's .onnx has been exported:
        # until then the shipped .pt on torch is the sensible choice, not an error.
        try:
            shipped_model_path(task, ".onnx")
        except ModelError:
            name, dev = choose_backend("torch", device)
    if name == "torch":
        return TorchBackend(task, resolve_model_path(model, task, ".pt"), dev, half=half, **options)
    if half:
        raise BackendUnavailable(f"half precision runs on the torch backend on a CUDA GPU, not on {name} on {dev}")
    if model is not None and not onnx_file:
        raise ModelError(f"backend '{name}' needs an .onnx model, got {model} (export it with lightfusion export-onnx)")
    runtime = OpenVinoBackend if name == "openvino" else OnnxBackend
    return runtime(task, resolve_model_path(model, task, ".onnx"), dev, **options)
