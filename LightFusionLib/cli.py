"""The ``lightfusion`` command line: train, evaluate, fuse, register, batch, demo, benchmark, export-onnx, info.

Every user error (a bad option, input or output; an OS error such as a full disk) ends as one line
``lightfusion <command>: error: <what is wrong>`` on stderr and exit code 2; every output path is
checked before the work starts, and outputs are written atomically, so a failed run leaves nothing
behind. Library warnings are one line each, ``lightfusion <command>: warning: ...``. Any other
exception is a bug: a short traceback and exit code 1.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import traceback
from pathlib import Path
from typing import NoReturn

from . import __version__
from .backends import BACKENDS, DEVICES
from .colormaps import COLORMAPS, NONE
from .colour import COLOUR_MODES
from .errors import FusionCancelled, LightFusionError
from .fileio import TEMP_PREFIX, check_output_file, os_error_reason
from .tasks import TASK_NAMES

TASK_CHOICES = list(TASK_NAMES)
BUG_FRAMES = 4  # frames of a bug's traceback shown: where it broke, not the whole call chain
# Our temporaries are named TEMP_PREFIX<host>-<pid>-<random>-<target name>: a message shows the target.
_TEMP_NAME = re.compile(rf"{re.escape(TEMP_PREFIX)}[0-9a-f]{{6}}-\d+-[0-9a-f]{{8}}-|\.lightfusion-probe-[0-9a-f]{{8}}-")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``lightfusion fuse: error: argument --task: ...`` and exit 2,
    without the usage block (``--help`` shows it). Options are not abbreviated: a prefix such as
    ``--mri`` would otherwise be taken for ``--mri-window`` and fail on its value, far from the slip."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {_one_line(message)}\n")


def _one_line(text: str) -> str:
    return " ".join(_TEMP_NAME.sub("", text).split())


# --- option types: a bad value is an argparse error naming the option -------------------------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"a whole number >= 1 is needed, got {text!r}")
    return value


def _int_list(text: str) -> list[int]:
    """'1,4,16' -> [1, 4, 16], each >= 1."""
    try:
        return [_positive_int(v) for v in text.split(",")]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"comma-separated whole numbers >= 1 are needed (e.g. 1,4,16), "
                                         f"got {text!r}") from None


DEFAULT_BENCHMARK_VOLUMES = ((256, 256, 256), (512, 512, 400))


def _volume_size(text: str) -> tuple[int, int, int]:
    """'X,Y,Z' -> (x, y, z); the synthetic PET is half that size and must still hold a head."""
    try:
        x, y, z = (int(v) for v in text.split(","))
    except ValueError:
        x = y = z = 0
    if min(x, y, z) < 16:
        raise argparse.ArgumentTypeError(f"three whole numbers X,Y,Z of at least 16 are needed "
                                         f"(e.g. 256,256,256), got {text!r}")
    return x, y, z


def _window(text: str) -> tuple[float, float]:
    """'LO,HI' -> (lo, hi); the library checks lo < hi."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a window is two numbers LO,HI (e.g. 0,80), got {text!r}") from None
    return lo, hi


def _colormap(text: str) -> str:
    name = text.strip().lower()
    if name not in COLORMAPS + (NONE,):
        raise argparse.ArgumentTypeError(f"unknown colour map {text!r}; choose one of "
                                         f"{', '.join(COLORMAPS + (NONE,))}")
    return name


def _add_backend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", default="auto", choices=list(BACKENDS),
                   help="inference backend (auto: torch on CUDA, else the faster of ONNX Runtime and OpenVINO on "
                        "the CPU, measured once per machine, else torch; openvino: the optional extra)")
    p.add_argument("--device", default="auto", choices=list(DEVICES),
                   help="where the network runs (auto: a CUDA GPU when the backend sees one, else the CPU)")
    p.add_argument("--half", action="store_true",
                   help="fp16 inference on a CUDA GPU with torch (within 1 grey level of fp32)")


def _add_fused_volume_args(p: argparse.ArgumentParser, mri_window_help: str, other_window_help: str,
                           colour_where: str) -> None:
    """The options of ``fuse`` and ``batch`` that decide the fused volume: windows, plane size, colour,
    compression, and --quiet."""
    p.add_argument("--mri-window", type=_window, metavar="LO,HI", help=mri_window_help)
    p.add_argument("--other-window", type=_window, metavar="LO,HI", help=other_window_help)
    p.add_argument("--plane-size", type=int, default=256,
                   help="planes run at N x N (aspect kept, padded); 0 = native size (default 256)")
    _add_colour_arg(p, colour_where)
    _add_compress_arg(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_compress_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compress", action="store_true",
                   help="zlib-compress .nrrd/.mha outputs (smaller files, a slower write: 512x512x400 RGB "
                        "2.4 s instead of 0.3 s); .nii.gz is always compressed")


def _add_colour_arg(p: argparse.ArgumentParser, where: str) -> None:
    p.add_argument("--colour", choices=COLOUR_MODES, default=None,
                   help=f"PET/SPECT colour restoration {where}: the paper's plain YUV (yuv, default: the source's "
                        "chroma under the fused luma) or chroma scaled with the luma (saturated); the fused luma "
                        "is the same (model card)")


def _cmd_train(args: argparse.Namespace) -> int:
    from .losses import LOSS_PRESETS, LossWeights
    from .tasks import get_task
    from .network import NetworkConfig
    from .training import TrainConfig, train

    preset = args.loss_preset if args.loss_preset != "auto" else get_task(args.task).loss_preset
    weights = LOSS_PRESETS[preset]
    try:
        weights = LossWeights(
            intensity=args.w_intensity if args.w_intensity is not None else weights.intensity,
            gradient=args.w_gradient if args.w_gradient is not None else weights.gradient,
            ssim=args.w_ssim if args.w_ssim is not None else weights.ssim,
            gradient_term=args.gradient_term or weights.gradient_term,
            intensity_target=args.intensity_target or weights.intensity_target,
            ssim_window=args.ssim_window or weights.ssim_window,
        )
    except ValueError as exc:
        raise LightFusionError(f"loss: {exc}") from None
    extra_tasks = {}
    for item in args.extra_task or []:
        name, _, held_out = item.partition(":")
        extra_tasks[name.strip()] = [c.strip() for c in held_out.split(",") if c.strip()]
    try:
        network = NetworkConfig(width=args.width, reduction=args.reduction, attention=args.attention, conv=args.conv)
    except ValueError as exc:  # NetworkConfig says what does not fit, as a plain ValueError
        raise LightFusionError(f"--width/--reduction: {exc}") from None
    cfg = TrainConfig(
        data=Path(args.data), task=args.task, out=Path(args.out), epochs=args.epochs,
        batch_size=args.batch_size, crop=args.crop, lr=args.lr, seed=args.seed, device=args.device,
        resume=Path(args.resume) if args.resume else None,
        val_cases=[c.strip() for c in args.val_cases.split(",") if c.strip()] if args.val_cases else [],
        crops_per_image=args.crops_per_image, loss_weights=weights, force=args.force, network=network,
        threads=args.threads, val_every=args.val_every, schedule=args.schedule, rotate=args.rotate,
        jitter=args.jitter, init=Path(args.init) if args.init else None, extra_tasks=extra_tasks,
    )
    result = train(cfg)
    print(f"wrote {result['out']} after {result['epochs']} epochs in {result['seconds']:.0f} s")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluation import evaluate, format_table

    if args.json:
        check_output_file(args.json, "JSON report")
    report = evaluate(args.data, args.task, model=args.model,
                      methods=[m.strip() for m in args.methods.split(",") if m.strip()],
                      backend=args.backend, device=args.device, save_images=args.save_images,
                      cases=[c.strip() for c in args.cases.split(",")] if args.cases else None,
                      progress=not args.quiet, half=args.half, score_on=args.score_on, colour=args.colour)
    if report.get("note"):
        print(f"note: {report['note']}")
    print(format_table(report))
    if args.json:
        _write_json(args.json, report)
    return 0


def _cmd_fuse(args: argparse.Namespace) -> int:
    from .fusion import fuse_files

    dicom = _DicomOutput(args) if args.format == "dicom" else None  # checked before any work
    result = fuse_files(args.mri, args.other, dicom.volume if dicom else args.output, task=args.task,
                        model=args.model, axis=args.axis,
                        backend=args.backend, device=args.device, colormap=args.colormap,
                        batch_size=args.batch_size, progress=not args.quiet,
                        mri_window=args.mri_window, other_window=args.other_window,
                        plane_size=args.plane_size or None, half=args.half, register=args.register,
                        transform=args.transform, save_transform=args.save_transform,
                        colour_mode=args.colour, compress=args.compress)
    written = dicom.write() if dicom else f"{result.output}"
    if result.registration is not None:
        print(result.registration.describe())
    print(f"wrote {written}: {result.planes} {args.axis} planes in {result.seconds:.1f} s "
          f"({result.planes_per_second:.1f} planes/s) with {result.backend}")
    if result.transform_file is not None:
        print(f"wrote {result.transform_file} (the transform, MRI -> {args.task.split('-')[0].upper()} points)")
    return 0


def _cmd_register(args: argparse.Namespace) -> int:
    from .registration import register_files

    result = register_files(args.mri, args.other, args.output, kind=args.register, progress=not args.quiet)
    print(result.describe())
    print(f"wrote {args.output}")
    return 0


def _add_register_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--register", default="none", choices=["none", "rigid", "affine"],
                   help="register the other volume to the MRI first (SimpleITK, Mattes mutual information): "
                        "rigid for the same head on another day, affine where the scanners' scales differ "
                        "(default none: the volumes are aligned as they lie)")
    p.add_argument("--transform", metavar="T.tfm",
                   help="apply this ITK transform file (MRI -> other points, as --save-transform, ITK and Slicer "
                        "write it) instead of registering")
    p.add_argument("--save-transform", metavar="T.tfm",
                   help="also write the transform used (.tfm), to reuse with --transform or load in Slicer")


class _DicomOutput:
    """``fuse --format dicom``: the MRI must be a DICOM series folder and ``-o`` a new folder (both
    checked first); the fused volume goes to a hidden temporary volume beside the folder, which
    :meth:`write` turns into the DICOM series (:func:`LightFusionLib.dicom_write.write_dicom_series`)
    and removes."""

    def __init__(self, args: argparse.Namespace) -> None:
        from .dicom_write import check_dicom_source
        from .fileio import check_new_output_folder, temp_path_for

        self.args = args
        self.source = check_dicom_source(args.mri, "MRI")
        self.folder = check_new_output_folder(args.output, "DICOM output folder",
                                              (Path(args.mri), Path(args.other)))
        self.volume = temp_path_for(self.folder.parent / "fused.nrrd")

    def write(self) -> str:
        from .dicom_write import write_dicom_series
        from .tasks import get_task
        from .volumeio import read_volume

        try:
            fused = read_volume(self.volume, "fused volume")
            write_dicom_series(fused, self.source, self.folder, task=self.args.task,
                               other_modality=get_task(self.args.task).modality)
        finally:
            self.volume.unlink(missing_ok=True)
        kind = "RGB" if fused.GetNumberOfComponentsPerPixel() == 3 else "MONOCHROME2"
        return f"{self.folder} (DICOM series, {fused.GetSize()[2]} {kind} instances)"


def _cmd_info(args: argparse.Namespace) -> int:
    from .info import format_info, gather_info

    info = gather_info()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(args.out, backend=args.backend, device=args.device, progress=not args.quiet, half=args.half,
             colour_mode=args.colour)
    return 0


def _cmd_benchmark(args: argparse.Namespace) -> int:
    from .benchmark import format_report, run_benchmark

    if args.json:
        check_output_file(args.json, "JSON report")
    if args.batch_cases:
        return _cmd_benchmark_batch(args)
    report = run_benchmark(task=args.task, backend=args.backend, device=args.device, batch_sizes=args.batch_sizes,
                           volume=not args.no_volume, seconds=args.seconds,
                           volume_shape=args.volume_size or list(DEFAULT_BENCHMARK_VOLUMES),
                           half=args.half)
    print(format_report(report))
    if args.json:
        _write_json(args.json, report)
    return 0


def _cmd_batch(args: argparse.Namespace) -> int:
    from .batch import FuseOptions, describe_case, plan_batch, run_plan

    plan = plan_batch(args.input, args.out, task=args.task, ext=args.ext, montage=not args.no_montage,
                      axis=args.axis, colormap=args.colormap, model=args.model, register=args.register)
    print(plan.describe())
    for skip in plan.skipped:
        print(f"  not fused: {skip['path']}: {skip['reason']}")
    if args.dry_run:
        for case in plan.cases:
            print(f"  {describe_case(case, plan)}" + (f" [{case.match}]" if case.match else ""))
        return 0
    options = FuseOptions(backend=args.backend, device=args.device, half=args.half, batch_size=args.batch_size,
                          plane_size=args.plane_size or None, mri_window=args.mri_window,
                          other_window=args.other_window, threads=args.threads, colour_mode=args.colour,
                          compress=args.compress)
    result = run_plan(plan, workers=args.workers, scheduler=args.scheduler, force=args.force, options=options,
                      progress=not args.quiet)
    print(result.describe())
    for row in result.failed[:20]:
        print(f"  failed {row['id']}: {row['message']}")
    if len(result.failed) > 20:
        print(f"  ... and {len(result.failed) - 20} more failed (summary.csv lists them all)")
    print(f"  {result.summary_csv}\n  {result.summary_json}" + (f"\n  {result.report}" if result.report else ""))
    return 3 if result.failed else 0


def _cmd_benchmark_batch(args: argparse.Namespace) -> int:
    from .benchmark import batch_benchmark, format_batch_report

    report = batch_benchmark(cases=args.batch_cases, workers=args.batch_workers, backend=args.backend,
                             device=args.device, memory_cases=args.memory_cases)
    print(format_batch_report(report))
    if args.json:
        _write_json(args.json, report)
    return 0


def _cmd_export_onnx(args: argparse.Namespace) -> int:
    from .onnx_export import export_onnx

    path = export_onnx(args.model, args.task, args.output)
    print(f"wrote {path}")
    return 0


def _write_json(path: str, obj: dict) -> None:
    from .fileio import atomic_output

    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lightfusion", description="LightFusionNet medical image fusion")
    parser.add_argument("--version", action="version", version=f"lightfusion {__version__}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("train", help="train a model on paired 2-D slices (unsupervised)")
    p.add_argument("--data", required=True, help="folder with MRI/ and PET/|SPECT/|CT/ (paired file names)")
    p.add_argument("--task", required=True, choices=TASK_CHOICES, help="the fusion task the model is for")
    p.add_argument("--out", required=True, help="model file to write (.pt)")
    p.add_argument("--epochs", type=_positive_int, default=100, help="default 100 (paper: 200; see the model card)")
    p.add_argument("--batch-size", type=_positive_int, default=4, help="image pairs per optimiser step (default 4)")
    p.add_argument("--crop", type=_positive_int, default=64, help="crop size (at least 11, the SSIM window)")
    p.add_argument("--lr", type=float, default=3e-3, help="default 3e-3 with the cosine schedule (paper: 1e-4, step; "
                                                           "the model card's study chose these)")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed on the CPU: same weights)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where to train (auto: a CUDA GPU when torch sees one, else the CPU)")
    p.add_argument("--resume", help="checkpoint to continue from (<out>.checkpoint.pt)")
    p.add_argument("--val-cases", help="comma-separated case ids held out for validation, e.g. 41")
    p.add_argument("--crops-per-image", type=_positive_int, default=1, help="random crops per image per epoch")
    p.add_argument("--loss-preset", default="auto", choices=["auto", "eq5", "ablation"],
                   help="eq5: I20/G100/S50 (paper eq. 5); ablation: I100/G50/S20 (paper Table 5); "
                        "auto: the one validated for the task (eq5 for PET/SPECT, ablation for CT)")
    p.add_argument("--w-intensity", type=float, help="intensity loss weight (overrides the preset's)")
    p.add_argument("--w-gradient", type=float, help="gradient loss weight (overrides the preset's)")
    p.add_argument("--w-ssim", type=float, help="SSIM loss weight (overrides the preset's)")
    p.add_argument("--gradient-term", choices=["sobel", "signed"],
                   help="sobel: |grad F| to the larger |grad| (paper eq. 2); signed: grad F to the signed "
                        "gradient of the source with the larger magnitude (default: the preset's)")
    p.add_argument("--intensity-target", choices=["max", "saliency"],
                   help="max: element-wise max (paper eq. 1); saliency: sources weighted by local contrast")
    p.add_argument("--ssim-window", type=_positive_int, help="SSIM loss window, odd (default: the preset's, 11)")
    p.add_argument("--schedule", default="cosine", choices=["step", "cosine"],
                   help="learning-rate schedule: cosine to 0 over the run (default) or step (x0.5 every 50 epochs, "
                        "the paper's)")
    p.add_argument("--rotate", action="store_true", help="augment with random 90-degree rotations")
    p.add_argument("--jitter", type=float, default=0.0, help="per-modality contrast jitter, e.g. 0.1 (default 0)")
    p.add_argument("--init", help="start from this model's weights (fine-tuning)")
    p.add_argument("--extra-task", action="append", metavar="TASK[:CASES]",
                   help="also train on this task's pairs (same --data root), leaving out CASES "
                        "(comma-separated); repeatable")
    p.add_argument("--width", type=_positive_int, default=16, help="feature channels of the network (default 16)")
    p.add_argument("--reduction", type=_positive_int, default=4, help="PCA bottleneck ratio (divides --width)")
    p.add_argument("--attention", default="pca", choices=["pca", "conv", "channel", "spatial", "none"],
                   help="attention block (pca: Predictive Context Attention, the paper's; others for ablations)")
    p.add_argument("--conv", default="dsc", choices=["dsc", "standard"],
                   help="convolutions: depthwise-separable (dsc, the paper's) or standard")
    p.add_argument("--threads", type=_positive_int, help="torch CPU threads")
    p.add_argument("--val-every", type=_positive_int, default=10, help="validate every N epochs (and at the end)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("evaluate", help="score LightFusion and baselines on paired slices")
    p.add_argument("--data", required=True, help="folder with MRI/ and PET/|SPECT/|CT/ (paired file names)")
    p.add_argument("--task", required=True, choices=TASK_CHOICES, help="the fusion task to score")
    p.add_argument("--model", help="model file (default: the shipped model of the task); a model trained for "
                                   "another task is run as it is, a cross-task experiment, with a note")
    p.add_argument("--methods", default="lightfusion,average,max,laplacian",
                   help="comma-separated methods to score (default lightfusion,average,max,laplacian)")
    p.add_argument("--cases", help="only these comma-separated case ids (e.g. a validation split)")
    p.add_argument("--score-on", choices=("luma", "rgb"), default="luma",
                   help="PET/SPECT: score the fused luma against the grey-level sources, the field's convention "
                        "(luma, default), or the luma of the RGB image after the chroma is put back and clipped, "
                        "what a user sees (rgb)")
    _add_colour_arg(p, "for --score-on rgb and --save-images")
    p.add_argument("--json", help="write the report as JSON here")
    p.add_argument("--save-images", help="folder for the fused images (<method>/<name>.png)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_backend_args(p)
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("fuse", help="fuse two co-registered 3-D volumes (output on the MRI grid)",
                       description="Fuse an MRI with a PET/SPECT/CT volume that is already registered to it "
                                   "(registration is not done here). Inputs: any format SimpleITK reads or a "
                                   "DICOM series folder; the output format follows OUT's extension, or "
                                   "--format dicom writes a DICOM series into the new folder OUT.")
    p.add_argument("mri", help="MRI volume (file or DICOM series folder)")
    p.add_argument("other", help="PET / SPECT / CT volume (file or DICOM series folder)")
    p.add_argument("-o", "--output", "--out", required=True,
                   help="output file (.nrrd, .nii.gz, .mha, ...; colour NIfTI is RGB24), or a new folder "
                        "with --format dicom")
    p.add_argument("--format", default="auto", choices=["auto", "dicom"],
                   help="auto: from OUT's extension; dicom: a DICOM series (one file per slice) in the new "
                        "folder OUT, in the MRI's patient and study (the MRI must be a DICOM series folder)")
    p.add_argument("--task", default="pet-mri", choices=TASK_CHOICES,
                   help="pet-mri (default), spect-mri or ct-mri: which shipped model and colour handling")
    p.add_argument("--model", help="model file (.pt or .onnx) instead of the task's shipped model")
    p.add_argument("--axis", default="axial", choices=["axial", "coronal", "sagittal"],
                   help="planes the network sees (default axial)")
    p.add_argument("--colormap", type=_colormap, help="colour map for scalar PET/SPECT: harvard-pet (PET default), "
                                      "harvard-spect (SPECT default), hot, jet; 'none' for grayscale output")
    p.add_argument("--batch-size", type=int, help="planes per network call (default: the backend's choice)")
    _add_fused_volume_args(p, "MRI intensity window (default: robust percentiles)",
                           "PET/SPECT/CT window in its units (default: percentiles; CT in HU: 0,80)", "of the fused volume")
    _add_register_args(p)
    _add_backend_args(p)
    p.set_defaults(func=_cmd_fuse)

    p = sub.add_parser("register", help="register a PET/SPECT/CT volume to an MRI and write the transform",
                       description="Rigid or affine registration of OTHER (moving) to MRI (fixed) with SimpleITK; "
                                   "writes an ITK transform file (MRI -> OTHER points) that `fuse --transform`, "
                                   "ITK and Slicer read. Prints the alignment measure before and after.")
    p.add_argument("mri", help="MRI volume (file or DICOM series folder), the fixed image")
    p.add_argument("other", help="PET / SPECT / CT volume (file or DICOM series folder), the moving image")
    p.add_argument("-o", "--output", "--out", required=True, metavar="T.tfm", help="transform file to write (.tfm)")
    p.add_argument("--register", default="rigid", choices=["rigid", "affine"],
                   help="rigid (default) or affine")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_register)

    p = sub.add_parser("batch", help="fuse a cohort (CSV manifest or BIDS dataset), resumable, on local processes "
                                     "or a Dask cluster, with a summary and a review report",
                       description="Fuse every case of a CSV manifest (id,mri,other[,task,axis,colormap,model,"
                                   "register], paths relative to the CSV) or of a BIDS dataset (anat T1w/T2w with "
                                   "the pet image or a CT, written as a BIDS-Derivatives folder). A rerun keeps "
                                   "the verified outputs and fuses the rest; a failing case is recorded and the "
                                   "others go on. Writes summary.csv, summary.json and report.html into --out. "
                                   "Exit code 3 when some cases failed.")
    p.add_argument("input", help="CSV manifest, or the root folder of a BIDS dataset")
    p.add_argument("--out", required=True,
                   help="output folder (created; for BIDS e.g. <dataset>/derivatives/lightfusion)")
    p.add_argument("--task", choices=TASK_CHOICES,
                   help="CSV: the task of rows without one (default pet-mri); BIDS: only pairs of this task "
                        "(pet-mri or ct-mri; default both)")
    p.add_argument("--workers", type=_positive_int, default=1,
                   help="worker processes on this machine, each loading the model once (default 1: in this process)")
    p.add_argument("--scheduler", metavar="ADDRESS",
                   help="run the cases on this Dask distributed scheduler (tcp://HOST:PORT; needs "
                        "pip install 'lightfusion[cluster]')")
    p.add_argument("--threads", type=_positive_int,
                   help="network threads per case (default: the cores shared out among the workers)")
    p.add_argument("--force", action="store_true", help="redo every case, also those with verified outputs")
    p.add_argument("--ext", help="format of the fused volumes: .nrrd (CSV default), .nii.gz (BIDS: the only one), .mha")
    p.add_argument("--no-montage", action="store_true",
                   help="write no montage PNG per case (the report then shows none)")
    p.add_argument("--dry-run", action="store_true",
                   help="list the cases (what is matched with what, where it goes) and what is not fused; fuse nothing")
    p.add_argument("--model", help="model file (.pt or .onnx) instead of the task's shipped model (BIDS: with --task)")
    p.add_argument("--axis", default="axial", choices=["axial", "coronal", "sagittal"],
                   help="planes the network sees (default axial; a CSV axis column overrides it)")
    p.add_argument("--colormap", type=_colormap, help="colour map for PET/SPECT cases: harvard-pet, harvard-spect, "
                                                      "hot, jet, or 'none' (default: the task's)")
    p.add_argument("--register", default="none", choices=["none", "rigid", "affine"],
                   help="register each other volume to its MRI first (default none: already aligned)")
    p.add_argument("--batch-size", type=_positive_int, help="planes per network call (default: the backend's choice)")
    _add_fused_volume_args(p, "MRI intensity window for every case (default: each volume's robust percentiles)",
                           "PET/SPECT/CT window for every case, in its units (default: each volume's own)",
                           "of the fused volumes")
    _add_backend_args(p)
    p.set_defaults(func=_cmd_batch)

    p = sub.add_parser("demo", help="fuse the bundled sample PET/MRI volumes",
                       description="Fuse the bundled sample pair (MNI152 T1 + simulated FDG-PET) and write "
                                   "fused.nrrd, montage.png and metrics.json into --out.")
    p.add_argument("--out", default="lightfusion-demo", help="output folder (created)")
    _add_colour_arg(p, "of the fused volume and montage")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_backend_args(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("benchmark", help="parameters, FLOPs and speed")
    p.add_argument("--task", default="pet-mri", choices=TASK_CHOICES, help="whose shipped model to time (default pet-mri)")
    p.add_argument("--batch-sizes", type=_int_list, default="1,4,16", help="comma-separated (default 1,4,16)")
    p.add_argument("--seconds", type=float, default=3.0, help="time per measurement")
    p.add_argument("--no-volume", action="store_true", help="skip the end-to-end volume benchmark")
    p.add_argument("--batch-cases", type=_positive_int,
                   help="instead: N copies of the sample pair through `lightfusion batch` against N sequential "
                        "`lightfusion fuse` processes, then worker memory over --memory-cases small cases")
    p.add_argument("--batch-workers", type=_positive_int, default=2, help="--workers of the batch benchmark (default 2)")
    p.add_argument("--memory-cases", type=int, default=200,
                   help="small synthetic cases of the batch memory run (default 200; 0 skips it)")
    p.add_argument("--volume-size", type=_volume_size, action="append",
                   help="X,Y,Z voxels of a synthetic MRI volume to fuse end to end and stage by stage (each at "
                        "least 16); repeatable (default: 256,256,256 and 512,512,400, a clinical CT/MRI size)")
    p.add_argument("--json", help="write the report as JSON here")
    _add_backend_args(p)
    p.set_defaults(func=_cmd_benchmark)

    p = sub.add_parser("export-onnx", help="export a model to ONNX (dynamic batch and size)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--task", choices=TASK_CHOICES, help="export the shipped model of this task")
    group.add_argument("--model", help="export this model file (.pt)")
    p.add_argument("-o", "--output", "--out", required=True, help="ONNX file to write (.onnx)")
    p.set_defaults(func=_cmd_export_onnx)

    p = sub.add_parser("info", help="version, shipped models, backends and devices",
                       description="Print the version, the models found (task, file, parameters), the "
                                   "inference backends installed and the devices they can use.")
    p.add_argument("--json", action="store_true", help="print it as JSON")
    p.set_defaults(func=_cmd_info)
    return parser


# The errors we raise on purpose; OSError is handled on its own (its reason in words).
USER_ERRORS = (LightFusionError, FusionCancelled)


def _os_error_message(exc: OSError) -> str:
    """'/data/x.png: permission denied': the path and the cause in words the user can act on."""
    paths = " -> ".join(str(p) for p in (exc.filename, exc.filename2) if p is not None)
    return f"{paths}: {os_error_reason(exc)}" if paths else os_error_reason(exc)


def _report_bug(prog: str, exc: BaseException) -> None:
    """A short traceback (the innermost frames, where it broke) and one line saying it is a bug."""
    frames = traceback.extract_tb(exc.__traceback__)[-BUG_FRAMES:]
    print(f"Traceback (innermost {len(frames)} frames):", file=sys.stderr)
    print("".join(traceback.format_list(frames)), end="", file=sys.stderr)
    first_line = (str(exc).strip().splitlines() or [""])[0]
    print(f"{prog}: internal error (a bug, please report it): {type(exc).__name__}: {first_line}", file=sys.stderr)


class _WarningLines(logging.Formatter):
    """``lightfusion fuse: warning: <message>`` on one line."""

    def __init__(self, prog: str) -> None:
        super().__init__()
        self.prog = prog

    def format(self, record: logging.LogRecord) -> str:
        return f"{self.prog}: {record.levelname.lower()}: {_one_line(record.getMessage())}"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or an argparse error already printed as one line
        return exc.code if isinstance(exc.code, int) else 2
    prog = f"{parser.prog} {args.command}"
    # The library logs input warnings on the "LightFusionLib" logger; show them on the terminal for
    # this run only (main() is also called in-process: handlers must not pile up).
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(_WarningLines(prog))
    library_log = logging.getLogger(__package__)
    library_log.addHandler(handler)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except USER_ERRORS as exc:
        print(f"{prog}: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:  # not caught where it happened: still the user's disk, permissions, ...
        print(f"{prog}: error: {_one_line(_os_error_message(exc))}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug: keep where it broke, so that it gets reported
        _report_bug(prog, exc)
        return 1
    finally:
        library_log.removeHandler(handler)


if __name__ == "__main__":
    sys.exit(main())
