"""edmfast: fast, verified EDM-style diffusion sampling."""

from . import reference
from .guidance import cfg_rescale

__all__ = ["reference", "cfg_rescale"]
__version__ = "0.1.0"
