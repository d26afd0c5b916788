"""``python -m LightFusionLib`` = the ``lightfusion`` command."""
import sys

from .cli import main

sys.exit(main())
