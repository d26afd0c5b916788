"""BIDS in and BIDS-Derivatives out for ``lightfusion batch``: which MRI goes with which PET or CT, and
where the fused image of a pair is written.

Matching (one pair per PET / CT image; every decision said in words)
--------------------------------------------------------------------
For each subject (``sub-<label>/``) and, when it has them, each session (``ses-<label>/``):

- the MRI is the ``anat/`` image with suffix ``T1w``, or ``T2w`` when there is no T1w (NIfTI,
  ``.nii`` or ``.nii.gz``). Several candidates (runs, acquisitions): the first by file name is used
  and the others are listed as skipped. A session without ``anat/`` uses the subject-level
  ``sub-<label>/anat/`` when there is one; an MRI from *another session* is never taken (it would
  need registration: list such pairs in a CSV manifest instead).
- every ``pet/`` image with suffix ``pet`` (BIDS-PET) is fused with it as ``pet-mri``;
- every image with suffix ``ct`` / ``CT`` in ``ct/`` or ``anat/`` is fused with it as ``ct-mri``
  (CT is not in the BIDS specification yet; BEP024 proposes the ``ct`` suffix).

What is not fused is listed with the reason: a PET / CT without an MRI, an MRI without a PET / CT,
an extra T1w, a task other than ``--task``. Only ``sub-*`` folders are read (not ``derivatives/``,
``sourcedata/``, ``code/``).

Output (BIDS-Derivatives)
-------------------------
``dataset_description.json`` (``DatasetType: derivative``, ``GeneratedBy`` LightFusion, the raw
dataset under ``DatasetLinks`` / ``SourceDatasets``), then per pair, in the source image's
subject / session / datatype folder, the source's entities plus ``space-<T1w|T2w>`` (the fused
image lies on the MRI's grid) and ``desc-fused``::

    sub-01/ses-01/pet/sub-01_ses-01_trc-FDG_space-T1w_desc-fused_pet.nii.gz   (+ .json sidecar)
    sub-01/figures/sub-01_ses-01_trc-FDG_space-T1w_desc-fusedmontage_pet.png

The sidecar names its ``Sources`` as BIDS URIs (``bids:raw:sub-01/...``) and says in
``LightFusion`` what was fused with which model and settings.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import LightFusionError

BIDS_VERSION = "1.9.0"
DESC = "fused"
MONTAGE_DESC = "fusedmontage"
NIFTI = (".nii.gz", ".nii")
MRI_SUFFIXES = ("T1w", "T2w")  # in order of preference
# BIDS entity order (specification, appendix "Entity table"); unknown entities keep their place before space.
ENTITY_ORDER = ("sub", "ses", "sample", "task", "tracksys", "acq", "nuc", "voi", "ce", "trc", "stain", "rec",
                "dir", "run", "mod", "echo", "flip", "inv", "mt", "part", "proc", "hemi", "space", "split",
                "recording", "chunk", "seg", "res", "den", "label", "desc")
_NAME = re.compile(r"^(?P<entities>(?:[A-Za-z0-9]+-[A-Za-z0-9]+_)*[A-Za-z0-9]+-[A-Za-z0-9]+)_(?P<suffix>[A-Za-z0-9]+)"
                   r"(?P<ext>\.nii(?:\.gz)?)$")


@dataclass(frozen=True)
class BidsName:
    """A parsed BIDS file name: entities in file order, suffix, extension."""

    entities: tuple[tuple[str, str], ...]
    suffix: str
    ext: str

    @classmethod
    def parse(cls, name: str) -> BidsName | None:
        match = _NAME.match(name)
        if match is None:
            return None
        pairs = tuple(tuple(part.split("-", 1)) for part in match["entities"].split("_"))
        return cls(pairs, match["suffix"], match["ext"])

    def get(self, key: str) -> str | None:
        return dict(self.entities).get(key)

    def derived(self, space: str, desc: str, suffix: str | None = None, ext: str | None = None) -> str:
        """The derivative's file name: these entities with ``space`` and ``desc`` set, in BIDS order."""
        entities = [(k, v) for k, v in self.entities if k not in ("space", "desc", "res", "den")]
        entities += [("space", space), ("desc", desc)]
        rank = {k: i for i, k in enumerate(ENTITY_ORDER)}
        order, last = [], -1
        for k, v in entities:
            last = rank.get(k, last)  # an unknown entity keeps its place after the known one before it
            order.append((last, k, v))
        order.sort(key=lambda t: t[0])  # stable
        return "_".join(f"{k}-{v}" for _, k, v in order) + f"_{suffix or self.suffix}{self.ext if ext is None else ext}"


@dataclass(frozen=True)
class BidsPair:
    """One pair found in a BIDS dataset (paths absolute)."""

    id: str  # the functional image's name without extension, e.g. sub-01_ses-01_trc-FDG_pet
    task: str  # pet-mri | ct-mri
    mri: Path
    other: Path
    output: Path  # fused image (.nii.gz) in the derivative folder
    sidecar: Path
    montage: Path
    space: str  # T1w | T2w
    sources: tuple[str, str]  # BIDS URIs of the MRI and the other image
    match: str  # how the pair was found, in words


@dataclass(frozen=True)
class BidsSkip:
    """Something in the dataset that is not fused, and why."""

    path: str  # relative to the dataset root
    reason: str

    def describe(self) -> str:
        return f"{self.path}: {self.reason}"


def is_bids_root(path: str | Path) -> bool:
    """A folder with ``dataset_description.json`` or ``sub-*`` folders."""
    p = Path(path)
    return p.is_dir() and ((p / "dataset_description.json").is_file() or any(p.glob("sub-*/")))


def _nifti(folder: Path) -> list[tuple[Path, BidsName]]:
    if not folder.is_dir():
        return []
    found = []
    for f in sorted(folder.iterdir()):
        if f.name.startswith(".") or not f.name.endswith(NIFTI):
            continue
        name = BidsName.parse(f.name)
        if name is not None:
            found.append((f, name))
    return found


def _mri_of(unit: Path, subject: Path, root: Path, skipped: list[BidsSkip]) -> tuple[Path, str, str] | None:
    """(MRI path, 'T1w'|'T2w', where it was found) of a subject or session folder, or None."""
    for folder, where in ((unit / "anat", "same session"), (subject / "anat", "subject-level anat")):
        if folder == subject / "anat" and unit == subject:
            where = "same subject"
        images = _nifti(folder)
        for suffix in MRI_SUFFIXES:
            candidates = [f for f, n in images if n.suffix == suffix]
            if candidates:
                chosen = candidates[0]
                for extra in candidates[1:]:
                    skipped.append(BidsSkip(_rel(extra, root), f"another {suffix} of {_rel(folder.parent, root)}; "
                                                                f"{chosen.name} is the MRI used (the first by name)"))
                for other in MRI_SUFFIXES[MRI_SUFFIXES.index(suffix) + 1:]:
                    for extra in (f for f, n in images if n.suffix == other):
                        skipped.append(BidsSkip(_rel(extra, root), f"not used: {chosen.name} is the MRI ({suffix} "
                                                                    f"is preferred to {other})"))
                return chosen, suffix, where
        if unit == subject:
            break
    return None


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def find_pairs(root: str | Path, out: str | Path, task: str | None = None) -> tuple[list[BidsPair], list[BidsSkip]]:
    """Every (MRI, PET|CT) pair of the BIDS dataset at ``root``, with its derivative paths under
    ``out``, and what was not fused (see the module's rules). ``task``: only 'pet-mri' or 'ct-mri'
    pairs (None: both). Raises LightFusionError for a folder that is not a BIDS dataset."""
    root, out = Path(root).resolve(), Path(out).resolve()
    if task not in (None, "pet-mri", "ct-mri"):
        raise LightFusionError(f"a BIDS dataset holds PET (pet-mri) and CT (ct-mri) images; --task {task} does not "
                               "apply (list SPECT pairs in a CSV manifest)")
    subjects = sorted(p for p in root.glob("sub-*") if p.is_dir())
    if not subjects:
        raise LightFusionError(f"{root} is not a BIDS dataset: no sub-<label> folders")
    pairs: list[BidsPair] = []
    skipped: list[BidsSkip] = []
    for subject in subjects:
        sessions = sorted(p for p in subject.glob("ses-*") if p.is_dir())
        for unit in sessions or [subject]:
            functional = [(f, n, "pet-mri") for f, n in _nifti(unit / "pet") if n.suffix == "pet"]
            functional += [(f, n, "ct-mri") for folder in ("ct", "anat") for f, n in _nifti(unit / folder)
                           if n.suffix.lower() == "ct"]
            where_unit = _rel(unit, root)
            if not functional:
                if (unit / "anat").is_dir():
                    skipped.append(BidsSkip(where_unit, "no pet/*_pet.nii[.gz] or CT (*_ct.nii[.gz]) image to fuse"))
                continue
            own_skips: list[BidsSkip] = []
            mri = _mri_of(unit, subject, root, own_skips)
            used = False
            for f, name, pair_task in functional:
                if task is not None and pair_task != task:
                    skipped.append(BidsSkip(_rel(f, root), f"a {pair_task} image; --task is {task}"))
                    continue
                if mri is None:
                    reason = f"no anat T1w or T2w image in {where_unit}"
                    if unit != subject:
                        reason += (f" (nor in {_rel(subject / 'anat', root)}); an MRI of another session needs "
                                   "registration: list the pair in a CSV manifest (register column)")
                    skipped.append(BidsSkip(_rel(f, root), reason))
                    continue
                mri_path, space, where = mri
                used = True
                stem = f.name[: -len(name.ext)]
                datatype = f.parent.name
                rel_dir = f.parent.relative_to(root)
                subject_label = subject.name
                pairs.append(BidsPair(
                    id=stem, task=pair_task, mri=mri_path, other=f,
                    output=out / rel_dir / name.derived(space, DESC, ext=".nii.gz"),
                    sidecar=out / rel_dir / name.derived(space, DESC, ext=".json"),
                    montage=out / subject_label / "figures" / name.derived(space, MONTAGE_DESC, ext=".png"),
                    space=space, sources=(f"bids:raw:{_rel(mri_path, root)}", f"bids:raw:{_rel(f, root)}"),
                    match=f"{datatype} image {f.name} with the {space} {mri_path.name} ({where})"))
            if used:
                skipped.extend(own_skips)
    unique = list({s.path: s for s in skipped}.values())  # a subject-level extra T1w is named once
    return pairs, unique


def dataset_description(root: str | Path) -> dict:
    """The derivative's ``dataset_description.json``."""
    from . import __version__

    uri = Path(root).resolve().as_uri()
    return {
        "Name": "LightFusion: MRI fused with PET / CT",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "LightFusion", "Version": __version__,
                         "Description": "LightFusionNet image fusion on the MRI's grid (lightfusion batch)"}],
        "SourceDatasets": [{"URL": uri}],
        "DatasetLinks": {"raw": uri},
    }


def write_dataset_description(root: str | Path, out: str | Path) -> Path:
    """Write (atomically) ``out/dataset_description.json`` when it is missing or says something else."""
    from .fileio import atomic_output

    path = Path(out) / "dataset_description.json"
    wanted = dataset_description(root)
    try:
        if json.loads(path.read_text()) == wanted:
            return path
    except (OSError, ValueError):
        pass
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(wanted, indent=2) + "\n")
    return path


def check_derivative_folder(root: str | Path, out: str | Path) -> None:
    """Refuse a derivative folder that is the dataset itself or lies in a subject's folder
    (``<root>/derivatives/lightfusion`` is the usual place)."""
    root, out = Path(root).resolve(), Path(out).resolve()
    if out == root:
        raise LightFusionError(f"--out {out} is the BIDS dataset itself; use e.g. {root / 'derivatives' / 'lightfusion'}")
    if out.is_relative_to(root):
        first = out.relative_to(root).parts[0]
        if first.startswith("sub-"):
            raise LightFusionError(f"--out {out} lies in the subject folder {root / first}; "
                                   f"use e.g. {root / 'derivatives' / 'lightfusion'}")
