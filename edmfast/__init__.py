"""edmfast: fast, verified EDM-style diffusion sampling.

Fused Triton / CUDA C++ / C++ kernels for the per-step Heun update, churn noise, preconditioning
and classifier-free guidance with rescale, driven by a graph-captured sampling loop; every fast
path is checked against `edmfast.reference`, a plain float64 PyTorch implementation of the math.
"""

# Imported on first use (PEP 562): `edmfast --help` and other torch-free paths start at once.
import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "analytic": (".analytic", None),
    "k_diffusion": (".k_diffusion", None),
    "edm": (".edm", None),
    "diffusers": (".diffusers", None),
    "reference": (".reference", None),
    "cfg_rescale": (".guidance", "cfg_rescale"),
    "DiscreteVPDenoiser": (".precond", "DiscreteVPDenoiser"),
    "EDMPrecond": (".precond", "EDMPrecond"),
    "FlowMatchDenoiser": (".precond", "FlowMatchDenoiser"),
    "Precond": (".precond", "Precond"),
    "VEPrecond": (".precond", "VEPrecond"),
    "VPPrecond": (".precond", "VPPrecond"),
    "iDDPMPrecond": (".precond", "iDDPMPrecond"),
    "PerSampleGenerator": (".rng", "PerSampleGenerator"),
    "Sampler": (".sampler", "Sampler"),
    "sample": (".sampler", "sample"),
    "ablation_sample": (".sampler", "ablation_sample"),
    "AblationOptions": (".solvers", "AblationOptions"),
    "from_edm": (".edm", "from_edm"),
    "load_network": (".edm", "load_network"),
    "AncestralSampler": (".ancestral", "AncestralSampler"),
    "sample_ancestral": (".ancestral", "sample_ancestral"),
    "ddpm_betas": (".schedules", "ddpm_betas"),
    "discrete_timesteps": (".schedules", "discrete_timesteps"),
    "iddpm_sigmas": (".schedules", "iddpm_sigmas"),
    "karras_sigmas": (".schedules", "karras_sigmas"),
    "rescale_zero_terminal_snr": (".schedules", "rescale_zero_terminal_snr"),
    "ve_sigmas": (".schedules", "ve_sigmas"),
    "vp_sigmas": (".schedules", "vp_sigmas"),
}


if TYPE_CHECKING:
    from . import analytic, diffusers, edm, k_diffusion, reference
    from .ancestral import AncestralSampler, sample_ancestral
    from .edm import from_edm, load_network
    from .guidance import cfg_rescale
    from .precond import (
        DiscreteVPDenoiser,
        EDMPrecond,
        FlowMatchDenoiser,
        Precond,
        VEPrecond,
        VPPrecond,
        iDDPMPrecond,
    )
    from .rng import PerSampleGenerator
    from .sampler import Sampler, ablation_sample, sample
    from .schedules import (
        ddpm_betas,
        discrete_timesteps,
        iddpm_sigmas,
        karras_sigmas,
        rescale_zero_terminal_snr,
        ve_sigmas,
        vp_sigmas,
    )
    from .solvers import AblationOptions
else:  # mypy reads the imports above; at run time they happen on first use

    def __getattr__(name: str) -> Any:
        try:
            module, attr = _EXPORTS[name]
        except KeyError:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
        value = importlib.import_module(module, __name__)
        if attr is not None:
            value = getattr(value, attr)
        globals()[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(globals()) | set(_EXPORTS))


__all__ = [
    "AblationOptions",
    "AncestralSampler",
    "DiscreteVPDenoiser",
    "EDMPrecond",
    "FlowMatchDenoiser",
    "PerSampleGenerator",
    "Precond",
    "Sampler",
    "VEPrecond",
    "VPPrecond",
    "ablation_sample",
    "analytic",
    "cfg_rescale",
    "ddpm_betas",
    "diffusers",
    "discrete_timesteps",
    "edm",
    "from_edm",
    "iDDPMPrecond",
    "iddpm_sigmas",
    "k_diffusion",
    "karras_sigmas",
    "load_network",
    "reference",
    "rescale_zero_terminal_snr",
    "sample",
    "sample_ancestral",
    "ve_sigmas",
    "vp_sigmas",
]
__version__ = "0.1.0"
