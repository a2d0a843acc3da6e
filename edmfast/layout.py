"""The data layout every backend, the planner and the oracle agree on: coefficient rows and flags.

A sampler is a sequence of fused passes whose coefficients live in float32 rows in device memory
(read by the kernels at run time, so a captured CUDA graph replays with a new schedule). This
module names the columns; it imports nothing, so `edmfast.reference`, `edmfast.plan`,
`edmfast.ops` and the kernels' Python side can all use it without importing each other.

The affine pass (`edmfast.ops.affine_step`, the pass every sampler plan is made of), per element of
sample b::

    out   = a x + b F + c0 h0 + c1 h1 + c2 h2 + c3 h3 + std eps
    net   = c_net out                      (the next network input, 1 or 2 row blocks)
    h_out = p x + q F                      (optional: e.g. the denoised D = c_skip x + c_out F)

with F the (guided) network output and h0..h3 history buffers. The first five columns are those
of the original Heun pass ``out = p x_hat + q x_prime + r F + std eps; net = c out`` (x_prime is
h0), so a row of `heun_step` is a row of `affine_step`.
"""

from __future__ import annotations

# ----------------------------------------------------------------------------- affine pass row
COEF_A = 0  # on the state x
COEF_C0 = 1  # on history h0 (the Heun correction point x')
COEF_B = 2  # on the network output F (guided)
COEF_STD = 3  # on the noise eps
COEF_NET = 4  # next network input = COEF_NET * out
COEF_C1 = 5  # on history h1
COEF_C2 = 6  # on history h2
COEF_C3 = 7  # on history h3
COEF_HP = 8  # h_out = COEF_HP * x + COEF_HQ * F
COEF_HQ = 9
COEF_SIZE = 16  # a plan's rows are padded to 16 floats (64 bytes); 10..15 are zero
HISTORY = 4  # history buffers one pass may read
COEF_HIST = (COEF_C0, COEF_C1, COEF_C2, COEF_C3)  # the column of h_k

# The Heun pass's names for the same columns (`edmfast.ops.heun_step`: rows of >= 5 floats).
COEF_P, COEF_Q, COEF_R, COEF_C = COEF_A, COEF_C0, COEF_B, COEF_NET
HEUN_COEF_MIN = 5

# ----------------------------------------------------------------------------- ancestral pass row
# x0 = ax x + af F, clamped to [-clip, clip] when clipping; mean = coef1 x0 + coef2 x + cf F;
# std from s and the (learned) variance; net = c out (docs/design.md §9). cf carries the model's own
# eps into DDIM's direction term when it is not recomputed from the clipped x0 (diffusers'
# use_clipped_model_output=False); rows of 8 (cf = 0, clip = 1) are the original layout.
ANC_AX, ANC_AF, ANC_COEF1, ANC_COEF2, ANC_LOG_BETA, ANC_LOG_BETA_TILDE, ANC_S, ANC_C = range(8)
ANC_CF = 8  # on the (guided) prediction F, added to the mean
ANC_CLIP = 9  # the clip bound (> 0), read only when clipping
ANC_SIZE = 16
ANC_VARIANCES = ("fixed", "learned", "learned_range")

# ----------------------------------------------------------------------------- flags
INT32_MAX = 2**31 - 1
BAD_NONE = INT32_MAX  # a `bad` entry holds this until its sample turns non-finite
