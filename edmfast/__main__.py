"""``python -m edmfast ...`` (also what ``torchrun -m edmfast generate ...`` runs)."""

import sys

from .cli import main

sys.exit(main())
