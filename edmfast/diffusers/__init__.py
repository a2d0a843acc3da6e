"""diffusers pipelines and schedulers on edmfast: exact schedules, and a one-line switch for a
pipeline's loop.

``pipe = edmfast.diffusers.accelerate(pipe)`` makes a `StableDiffusionPipeline`,
`StableDiffusionXLPipeline`, `StableDiffusion3Pipeline` or `FluxPipeline` (`PIPELINES`) run its
denoising loop on edmfast's fused passes and return what the stock pipeline returns, within
float32 rounding (`edmfast.diffusers.pipelines`). Supported schedulers and their options:
`CONFIG_OPTIONS` (`edmfast.diffusers.schedules`; the flow-matching ones of SD3 / FLUX in
`edmfast.diffusers.flow`); anything else, or an option whose math edmfast does not reproduce,
raises a ValueError naming it (never a silent switch to different math).

Importing this package does not import diffusers; the functions do.
"""

from .pipelines import PIPELINES, accelerate
from .schedules import CONFIG_OPTIONS, SCHEDULERS, Schedule, check_config, denoiser, schedule, sigmas

__all__ = [
    "CONFIG_OPTIONS",
    "PIPELINES",
    "SCHEDULERS",
    "Schedule",
    "accelerate",
    "check_config",
    "denoiser",
    "schedule",
    "sigmas",
]
