"""The errors LightFusion raises on purpose. Each message says what is wrong in one line.

Everything a user can cause (a bad file, a bad option, a model of another task) is a
:class:`LightFusionError`; the command line prints those as one line and exits with 2. Any other
exception is a bug and keeps its traceback (exit 1), so that it gets reported.
"""
from __future__ import annotations


class LightFusionError(ValueError):
    """A user-caused problem; ``str(exc)`` is the one-line message."""


class VolumeError(LightFusionError):
    """An input or output volume that cannot be used."""


class FusionCancelled(Exception):
    """``cancel()`` returned True; nothing was returned or written."""
