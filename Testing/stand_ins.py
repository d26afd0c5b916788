"""Stand-ins shared by the tests: a backend that needs no model, and the real scans' paths."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

REALDATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "realdata"
SPM = REALDATA / "spm12"
PORCINE_CT = REALDATA / "porcine-head" / "ct.nrrd"
PORCINE_MR = REALDATA / "porcine-head" / "mr-t2-dicom"
NEMA_PET = REALDATA / "nema-pet-dicom"
SAMPLE = Path(__file__).resolve().parents[1] / "LightFusionLib" / "Resources" / "SampleData"
# The pig CT registered to its T2 MRI (fixed -> moving; Euler angles about x, y, z in radians, then
# translation in mm, about PORCINE_CENTRE), checked by eye on scripts/registration_study.py's montage
# and checkerboards: the CT's bones (> 300 HU) fall on the MRI's dark cortical lines in all three
# planes. The CT lies turned 180 degrees about y (head first vs feet first). Without the turn search
# the registration stops in a local optimum 13 degrees about z from the identity where only the
# box-like outline fits (alignment measure 0.61 there, 0.67 here).
PORCINE_RIGID = (-0.027, 3.107, 0.062, -18.22, -17.65, 1.03)
PORCINE_CENTRE = (2.865, 22.49, -8.965)
needs_realdata = pytest.mark.skipif(not REALDATA.is_dir(), reason="../shared/data/realdata not present")


class MeanBackend:
    """Stand-in for a LightFusionLib backend: fused luma = mean of the two inputs (no model), so a
    test can predict every fused voxel."""

    name = "fake"
    device = "cpu"
    preferred_batch = 4

    def __init__(self, task: str = "pet-mri") -> None:
        self.task = task
        self.calls = 0

    def __call__(self, mri: np.ndarray, other: np.ndarray) -> np.ndarray:
        self.calls += 1
        return (np.asarray(mri, np.float32) + np.asarray(other, np.float32)) / 2

    def describe(self) -> str:
        return "fake on cpu"
