#!/usr/bin/env python3
"""Measure LightFusion's built-in registration (``LightFusionLib.registration``) on real volumes.

1. Recovery of known rigid moves. An aligned pair's PET / SPECT is moved by ``--moves`` random rigid
   transforms (rotation about a random axis through the MRI's head centre, up to ``--max-deg``
   degrees; translation in a random direction up to ``--max-mm`` mm; seeded), resampled on its own
   grid (content moved past the field of view is lost, as when the patient lies elsewhere in the
   scanner), and registered back with :func:`register` (its checks included: a refusal counts as a
   failure). Target registration error (TRE) = distance between the true and the recovered mapping
   of the MRI's head points (Otsu foreground on a ~4 mm grid), mean over the points per move; the
   table gives its median and maximum over the moves.
   - bundled sample (T1 template + PET simulated from it): the truth is the move itself;
   - SPM12 T1 vs PET / SPECT templates (aligned only to ~2-3 mm): the truth is the move composed with
     the registration of the unmoved pair, whose own distance from the identity is reported too
     ("unmoved vs identity").
2. The real unaligned porcine head (CT moving, T2 MRI DICOM fixed): alignment measure before / after
   (``alignment.measure_alignment``, Mattes MI in nats), time, and PNG montages (``--montage``; rows
   before / after, columns axial / coronal / sagittal through the MRI's head centre; MRI in grey,
   the CT's tissue (> -300 HU: outline and gas pockets) in green, its bone (> 300 HU) outlined in
   yellow, its gold markers (> 2000 HU) ringed in cyan;
   a second file ``*-marker.png`` zooms on planes through a gold marker, where the registration puts it).
3. Timing of a 256^3 pair: the porcine CT resampled to 256^3 at 1 mm, registered to itself moved by
   a known rigid move (TRE reported too; median of ``--timing-runs`` runs). "seconds" everywhere is
   the registration's wall time (``RegistrationResult.seconds``: without reading the volumes and
   without the two alignment measurements).

Prints a markdown table; ``--json`` writes every number. Usage:
    python scripts/registration_study.py [--data-root ../shared/data/realdata] [--moves 12] [--kinds rigid affine]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from LightFusionLib.alignment import measure_alignment  # noqa: E402
from LightFusionLib.demo import sample_paths  # noqa: E402
from LightFusionLib.registration import SETTINGS, RegistrationError, register  # noqa: E402
from LightFusionLib.volumeio import read_volume  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "realdata"
SKIN_HU, BONE_HU, MARKER_HU = -300.0, 300.0, 2000.0


# --- known moves and TRE ---------------------------------------------------------------------------

def head_points(mri: sitk.Image, step_mm: float = 4.0) -> np.ndarray:
    """Physical points (n, 3) of the MRI's Otsu foreground on a grid of about ``step_mm``."""
    factors = [max(1, int(round(step_mm / s))) for s in mri.GetSpacing()]
    coarse = sitk.BinShrink(sitk.Cast(mri, sitk.sitkFloat32), factors)
    kji = np.argwhere(sitk.GetArrayViewFromImage(sitk.OtsuThreshold(coarse, 0, 1)) > 0).astype(float)
    matrix = np.array(coarse.GetDirection()).reshape(3, 3) * np.array(coarse.GetSpacing())
    return np.array(coarse.GetOrigin()) + kji[:, ::-1] @ matrix.T


def random_moves(n: int, centre: np.ndarray, seed: int, max_deg: float, max_mm: float) -> list[sitk.Euler3DTransform]:
    """``n`` rigid moves: rotation about a random axis through ``centre`` by up to ``max_deg``,
    translation in a random direction by up to ``max_mm`` (uniform magnitudes)."""
    rng = np.random.default_rng(seed)
    moves = []
    for _ in range(n):
        axis = rng.normal(size=3)
        axis /= np.linalg.norm(axis)
        versor = sitk.VersorRigid3DTransform()
        versor.SetRotation(tuple(axis), float(np.radians(rng.uniform(0, max_deg))))
        shift = rng.normal(size=3)
        shift *= rng.uniform(0, max_mm) / np.linalg.norm(shift)
        move = sitk.Euler3DTransform()
        move.SetCenter(tuple(map(float, centre)))
        move.SetMatrix(versor.GetMatrix())
        move.SetTranslation(tuple(map(float, shift)))
        moves.append(move)
    return moves


def moved(image: sitk.Image, move: sitk.Transform) -> sitk.Image:
    """``image``'s content displaced by ``move`` on its own grid: moved(y) = image(move^-1(y)), so the
    MRI -> moved mapping is ``move`` (after the MRI -> image mapping)."""
    background = float(sitk.GetArrayViewFromImage(image).min())
    return sitk.Resample(image, image, move.GetInverse(), sitk.sitkLinear, background)


def apply(transform: sitk.Transform, points: np.ndarray) -> np.ndarray:
    return np.array([transform.TransformPoint(tuple(map(float, p))) for p in points])


def tre(points: np.ndarray, recovered: sitk.Transform, truth: sitk.Transform) -> float:
    """Mean distance (mm) between the recovered and the true mapping of ``points``."""
    return float(np.linalg.norm(apply(recovered, points) - apply(truth, points), axis=1).mean())


def then(first: sitk.Transform, second: sitk.Transform) -> sitk.Transform:
    """x -> second(first(x)) (a CompositeTransform applies the transform added last first)."""
    return sitk.CompositeTransform([second, first])


def recovery(name: str, mri: sitk.Image, other: sitk.Image, kind: str, args, exact: bool) -> dict:
    points = head_points(mri)
    row: dict = {"data": name, "kind": kind, "moves": args.moves, "points": len(points)}
    base: sitk.Transform = sitk.Transform(3, sitk.sitkIdentity)
    if not exact:
        unmoved = register(mri, other, kind)
        base = unmoved.transform
        row["unmoved_vs_identity_mm"] = tre(points, base, sitk.Transform(3, sitk.sitkIdentity))
    errors, errors_move_only, seconds, before, after, failures = [], [], [], [], [], []
    for i, move in enumerate(random_moves(args.moves, points.mean(0), args.seed, args.max_deg, args.max_mm)):
        try:
            result = register(mri, moved(other, move), kind)
        except RegistrationError as exc:
            failures.append(f"move {i}: {exc}")
            errors.append(float("inf"))
            continue
        errors.append(tre(points, result.transform, then(base, move)))
        errors_move_only.append(tre(points, result.transform, move))
        seconds.append(result.seconds)
        before.append(result.measure_before)
        after.append(result.measure_after)
    row.update(tre_median_mm=float(np.median(errors)), tre_max_mm=float(np.max(errors)), tre_mm=errors,
               seconds_mean=float(np.mean(seconds)) if seconds else None,
               measure_before_median=float(np.median(before)) if before else None,
               measure_after_median=float(np.median(after)) if after else None, failures=failures)
    if not exact:
        row["tre_vs_move_alone_median_mm"] = float(np.median(errors_move_only)) if errors_move_only else None
    return row


# --- the porcine head ------------------------------------------------------------------------------

def display_grid(mri: sitk.Image, spacing: float, centre=None, half_mm=None) -> sitk.Image:
    """An axis-aligned (LPS) grid of ``spacing`` mm over the MRI's extent, or a cube of half-size
    ``half_mm`` around ``centre``."""
    if centre is None:
        corners = [mri.TransformContinuousIndexToPhysicalPoint([float(c) for c in (i, j, k)])
                   for i in (-0.5, mri.GetSize()[0] - 0.5) for j in (-0.5, mri.GetSize()[1] - 0.5)
                   for k in (-0.5, mri.GetSize()[2] - 0.5)]
        lo, hi = np.min(corners, 0), np.max(corners, 0)
    else:
        lo, hi = np.asarray(centre) - half_mm, np.asarray(centre) + half_mm
    size = [int(np.ceil((b - a) / spacing)) for a, b in zip(lo, hi)]
    grid = sitk.Image(size, sitk.sitkUInt8)
    grid.SetSpacing([spacing] * 3)
    grid.SetOrigin(tuple(lo + spacing / 2))
    return grid


def planes(volume: np.ndarray, ijk: tuple[int, int, int]) -> list[np.ndarray]:
    """Axial, coronal, sagittal planes of an LPS (k, j, i) array through voxel ``ijk``: axial with
    anterior up and the patient's right on the left, coronal and sagittal with superior up."""
    i, j, k = ijk
    return [volume[k], volume[::-1, j, :], volume[::-1, :, i]]


def outline(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a 2-D mask (inside pixels with an outside 4-neighbour)."""
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & mask
    return mask & ~interior


def ring(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """Pixels just outside a 2-D mask (so the MRI under a small marker stays visible)."""
    grown = mask.copy()
    for _ in range(width):
        padded = np.pad(grown, 1)
        grown = grown | padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
    return grown & ~mask


def overlay(mri_plane: np.ndarray, ct_plane: np.ndarray, lo: float, hi: float) -> np.ndarray:
    grey = np.clip((mri_plane - lo) / (hi - lo) * 255, 0, 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    rgb[outline(ct_plane > SKIN_HU)] = (0, 200, 0)
    rgb[outline(ct_plane > BONE_HU)] = (255, 220, 0)
    rgb[ring(ct_plane > MARKER_HU)] = (0, 255, 255)
    return rgb


def montage(mri: sitk.Image, ct: sitk.Image, transform: sitk.Transform, grid: sitk.Image, point, path: Path) -> None:
    """Rows: before (identity), after (``transform``); columns: axial, coronal, sagittal through ``point``."""
    mri_d = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(mri, sitk.sitkFloat32), grid, sitk.Transform(),
                                                 sitk.sitkLinear, 0.0))
    lo, hi = np.percentile(mri_d[mri_d > 0], (1, 99.5)) if np.any(mri_d > 0) else (0.0, 1.0)
    ijk = grid.TransformPhysicalPointToIndex(tuple(map(float, point)))
    rows = []
    for t in (sitk.Transform(3, sitk.sitkIdentity), transform):
        ct_d = sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(ct, sitk.sitkFloat32), grid, t, sitk.sitkLinear, -1024.0))
        cells = [overlay(m, c, lo, hi) for m, c in zip(planes(mri_d, ijk), planes(ct_d, ijk))]
        height = max(c.shape[0] for c in cells)
        cells = [np.pad(c, ((0, height - c.shape[0]), (0, 4), (0, 0))) for c in cells]
        rows.append(np.concatenate(cells, axis=1))
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0))) for r in rows]
    image = sitk.GetImageFromArray(np.concatenate(rows, axis=0), isVector=True)
    sitk.WriteImage(image, str(path))


def markers(ct: sitk.Image) -> list[np.ndarray]:
    """Physical centres of the gold markers (connected components > 2000 HU), largest first."""
    labels = sitk.ConnectedComponent(ct > MARKER_HU)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(labels)
    found = sorted(stats.GetLabels(), key=stats.GetPhysicalSize, reverse=True)
    return [np.array(stats.GetCentroid(label)) for label in found if stats.GetPhysicalSize(label) < 200]


def porcine(root: Path, kind: str, args) -> dict:
    mri = read_volume(root / "porcine-head" / "mr-t2-dicom", "MRI")
    ct = read_volume(root / "porcine-head" / "ct.nrrd", "CT")
    row: dict = {"data": "porcine CT -> T2 MRI", "kind": kind}
    try:
        result = register(mri, ct, kind)
    except RegistrationError as exc:
        row["failures"] = [str(exc)]
        return row
    row.update(measure_before=result.measure_before, measure_after=result.measure_after, seconds=result.seconds,
               parameters=list(result.transform.GetParameters()), initializer=result.initializer,
               iterations=result.iterations, overlap=result.overlap)
    if args.montage and kind == "rigid":
        path = Path(args.montage)
        centre = head_points(mri).mean(0)
        montage(mri, ct, result.transform, display_grid(mri, 1.0), centre, path)
        found = markers(ct)
        if found:
            # Where the registration puts the marker nearest the CT's centre, in MRI space.
            ct_centre = np.mean([m for m in found], axis=0)
            marker = min(found, key=lambda m: np.linalg.norm(m - ct_centre))
            at = np.array(result.transform.GetInverse().TransformPoint(tuple(map(float, marker))))
            zoom = path.with_name(path.stem + "-marker" + path.suffix)
            montage(mri, ct, result.transform, display_grid(mri, 0.25, at, 30.0), at, zoom)
            row["montages"] = [str(path), str(zoom)]
            row["marker_mri_mm"] = at.tolist()
        else:
            row["montages"] = [str(path)]
    return row


def timing_256(root: Path, kind: str, args) -> dict:
    ct = read_volume(root / "porcine-head" / "ct.nrrd", "CT")
    grid = sitk.Image([256] * 3, sitk.sitkInt16)
    grid.SetSpacing([1.0] * 3)
    extent = np.array(ct.GetSize()) * np.array(ct.GetSpacing())
    grid.SetOrigin(tuple(np.array(ct.GetOrigin()) - np.array(ct.GetSpacing()) / 2 + (extent - 256) / 2 + 0.5))
    fixed = sitk.Resample(ct, grid, sitk.Transform(), sitk.sitkLinear, -1024)
    points = head_points(fixed, 6.0)
    move = random_moves(1, points.mean(0), args.seed + 1, args.max_deg, args.max_mm)[0]
    row: dict = {"data": "256^3 CT vs itself moved", "kind": kind}
    other = moved(fixed, move)
    seconds, cpu = [], []
    for _ in range(args.timing_runs):  # the machine may be shared: the median of a few runs
        start = time.process_time()
        try:
            result = register(fixed, other, kind)
        except RegistrationError as exc:
            row["failures"] = [str(exc)]
            return row
        seconds.append(result.seconds)
        cpu.append(time.process_time() - start)  # all threads, measurements included
    row.update(seconds=float(np.median(seconds)), seconds_all=seconds, cpu_seconds_all=cpu,
               tre_median_mm=tre(points, result.transform, move),
               measure_before=result.measure_before, measure_after=result.measure_after)
    row["tre_max_mm"] = row["tre_median_mm"]
    return row


# --- report ------------------------------------------------------------------------------------------

def fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> str:
    lines = ["| data | kind | moves | TRE median (mm) | TRE max (mm) | unmoved vs identity (mm) | "
             "measure before -> after | seconds | failures |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        before = r.get("measure_before", r.get("measure_before_median"))
        after = r.get("measure_after", r.get("measure_after_median"))
        seconds = r.get("seconds", r.get("seconds_mean"))
        lines.append(f"| {r['data']} | {r['kind']} | {r.get('moves', '-')} | {fmt(r.get('tre_median_mm'))} | "
                     f"{fmt(r.get('tre_max_mm'))} | {fmt(r.get('unmoved_vs_identity_mm'))} | "
                     f"{fmt(before, '.3f')} -> {fmt(after, '.3f')} | {fmt(seconds, '.1f')} | "
                     f"{len(r.get('failures', []))} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA, help="shared real data folder")
    parser.add_argument("--moves", type=int, default=12, help="known moves per pair (default 12)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-deg", type=float, default=15.0)
    parser.add_argument("--max-mm", type=float, default=30.0)
    parser.add_argument("--kinds", nargs="+", choices=("rigid", "affine"), default=["rigid"])
    parser.add_argument("--pairs", nargs="+", default=["sample", "spm-pet", "spm-spect", "porcine", "256"],
                        choices=("sample", "spm-pet", "spm-spect", "porcine", "256"))
    parser.add_argument("--timing-runs", type=int, default=3, help="runs of the 256^3 pair (median reported)")
    parser.add_argument("--montage", default="/tmp/pig_before_after.png", help="porcine montage PNG ('' = none)")
    parser.add_argument("--json", type=Path, help="write every number here")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    print(f"settings: {SETTINGS}; {sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()} ITK threads", flush=True)
    rows: list[dict] = []

    def add(row: dict) -> None:
        rows.append(row)
        print(table([row]).splitlines()[-1], flush=True)

    spm = args.data_root / "spm12"
    for kind in args.kinds:
        if "sample" in args.pairs:
            mri_path, pet_path = sample_paths()
            add(recovery("bundled T1 / simulated PET", read_volume(mri_path), read_volume(pet_path), kind,
                         args, exact=True))
        for pair, name in (("spm-pet", "PET"), ("spm-spect", "SPECT")):
            if pair in args.pairs:
                add(recovery(f"SPM12 T1 / {name}", read_volume(spm / "T1.nii"), read_volume(spm / f"{name}.nii"),
                             kind, args, exact=False))
        if "porcine" in args.pairs:
            add(porcine(args.data_root, kind, args))
        if "256" in args.pairs:
            add(timing_256(args.data_root, kind, args))
    print()
    print(table(rows))
    for r in rows:
        for failure in r.get("failures", []):
            print(f"- {r['data']} ({r['kind']}): {failure}")
    print(f"\n{time.perf_counter() - start:.0f} s in all")
    if args.json:
        args.json.write_text(json.dumps({"settings": repr(SETTINGS), "args": {k: str(v) for k, v in vars(args).items()},
                                         "rows": rows}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
