"""edmfast: fast, verified EDM-style diffusion sampling.

Fused Triton / CUDA C++ / C++ kernels for the per-step Heun update, churn noise, preconditioning
and classifier-free guidance with rescale, driven by a graph-captured sampling loop; every fast
path is checked against `edmfast.reference`, a plain float64 PyTorch implementation of the math.
"""

from . import analytic, k_diffusion, reference
from .guidance import cfg_rescale
from .precond import DiscreteVPDenoiser, EDMPrecond, Precond, VEPrecond, VPPrecond, iDDPMPrecond
from .rng import PerSampleGenerator
from .sampler import Sampler, sample
from .schedules import (
    discrete_timesteps,
    iddpm_sigmas,
    karras_sigmas,
    rescale_zero_terminal_snr,
    ve_sigmas,
    vp_sigmas,
)

__all__ = [
    "DiscreteVPDenoiser",
    "EDMPrecond",
    "PerSampleGenerator",
    "Precond",
    "Sampler",
    "VEPrecond",
    "VPPrecond",
    "analytic",
    "cfg_rescale",
    "discrete_timesteps",
    "iDDPMPrecond",
    "iddpm_sigmas",
    "k_diffusion",
    "karras_sigmas",
    "reference",
    "rescale_zero_terminal_snr",
    "sample",
    "ve_sigmas",
    "vp_sigmas",
]
__version__ = "0.1.0"
