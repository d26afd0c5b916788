"""The fusion tasks: the one place that knows, per task, the other volume's modality, how it is
windowed and coloured, and which model ships for it.

Every module (library, command line, Slicer module) takes its list of tasks and their properties
from :data:`TASKS`; nothing else compares task strings.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import LightFusionError


@dataclass(frozen=True)
class Task:
    """One fusion task: the MRI plus ``modality``.

    ``name``: 'pet-mri' (also the shipped model's file stem and the training data's folder
    ``<MODALITY>-MRI``). ``modality``: 'PET', the other volume's label and training folder name.
    ``dicom_modalities``: DICOM Modality (0008,0060) values expected for the other volume.
    ``functional``: a PET/SPECT, coloured with ``default_colormap`` and fused on its luma; a CT
    (not functional) is fused as grey levels. ``window``: how the other volume's intensities are
    windowed (:mod:`LightFusionLib.windows`). ``loss_preset``: the training loss weighting validated
    for the task (:mod:`LightFusionLib.losses`).
    """

    name: str
    modality: str
    dicom_modalities: tuple[str, ...]
    functional: bool
    default_colormap: str | None
    window: str
    loss_preset: str
    label: str

    @property
    def model_stem(self) -> str:
        return self.name


MRI_DICOM_MODALITIES = ("MR",)

TASKS: dict[str, Task] = {
    t.name: t for t in (
        Task("pet-mri", "PET", ("PT",), True, "harvard-pet", "functional", "eq5", "PET-MRI"),
        Task("spect-mri", "SPECT", ("NM", "ST"), True, "harvard-spect", "functional", "eq5", "SPECT-MRI"),
        # Table-5 weighting chosen for CT on validation cases (Resources/Models/README.md)
        Task("ct-mri", "CT", ("CT",), False, None, "ct", "ablation", "CT-MRI"),
    )
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def get_task(task: str | Task) -> Task:
    """The :class:`Task` for a name ('PET-MRI', 'pet-mri', ...); raises LightFusionError."""
    if isinstance(task, Task):
        return task
    key = str(task).strip().lower()
    if key not in TASKS:
        raise LightFusionError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    return TASKS[key]


def check_task(task: str | Task) -> str:
    """Normalised task name ('PET-MRI' -> 'pet-mri'); raises LightFusionError."""
    return get_task(task).name
