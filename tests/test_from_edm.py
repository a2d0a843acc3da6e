"""`edmfast.edm.from_edm`: official-shaped preconditioners on the fused engine.

The stand-ins below follow the shape of NVlabs/edm's ``training/networks.py`` (class names,
attributes, forward signature, an inner UNet that requires ``class_labels``), written here from
the paper's Table 1; no official code is copied.
"""

import math
import pickle

import pytest
import torch
from torch import nn

import edmfast
from edmfast import precond, reference
from edmfast.edm import OfficialUNet, from_edm, load_network
from tests.conftest import TOL, rel_err

RUN_TOL = 2e-5


class TinyUNet(nn.Module):
    """(x, noise_labels, class_labels) -> F; class_labels required, None only when label_dim = 0."""

    def __init__(self, channels, label_dim, out_channels=None):
        super().__init__()
        self.label_dim = label_dim
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)
        self.emb = nn.Linear(1, out_channels or channels)
        self.lab = nn.Linear(label_dim, out_channels or channels, bias=False) if label_dim else None

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        assert noise_labels.dim() == 1
        h = (
            self.conv(x.to(torch.float32))
            + self.emb(noise_labels.reshape(-1, 1).to(torch.float32))[:, :, None, None]
        )
        if self.label_dim:
            assert class_labels is not None, "the official UNets require class_labels"
            h = h + self.lab(class_labels)[:, :, None, None]
        else:
            assert class_labels is None
        return torch.tanh(h) * 0.5


class _Official(nn.Module):
    def __init__(self, res, ch, label_dim, use_fp16, out_ch=None):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim, self.use_fp16 = res, ch, label_dim, use_fp16
        self.model = TinyUNet(ch, label_dim, out_ch)

    def forward(self, x, sigma, class_labels=None, force_fp32=False):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim])
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        c_skip, c_out, c_in, c_noise = self.coefs(sigma)
        f = self.model((c_in * x).to(torch.float32), c_noise.flatten(), class_labels)
        return c_skip * x + c_out * f[:, : self.img_channels].to(torch.float32)


class EDMPrecond(_Official):
    def __init__(
        self, res, ch, label_dim=0, use_fp16=False, sigma_min=0, sigma_max=float("inf"), sigma_data=0.5
    ):
        super().__init__(res, ch, label_dim, use_fp16)
        self.sigma_min, self.sigma_max, self.sigma_data = sigma_min, sigma_max, sigma_data

    def coefs(self, s):
        sd = self.sigma_data
        return sd**2 / (s**2 + sd**2), s * sd / (s**2 + sd**2).sqrt(), 1 / (sd**2 + s**2).sqrt(), s.log() / 4


class VPPrecond(_Official):
    def __init__(
        self, res, ch, label_dim=0, use_fp16=False, beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5
    ):
        super().__init__(res, ch, label_dim, use_fp16)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = beta_d, beta_min, M, epsilon_t
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1))

    def sigma(self, t):
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * t**2 + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, s):
        s = torch.as_tensor(s)
        return ((self.beta_min**2 + 2 * self.beta_d * (1 + s**2).log()).sqrt() - self.beta_min) / self.beta_d

    def coefs(self, s):
        return 1, -s, 1 / (s**2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(s)


class VEPrecond(_Official):
    def __init__(self, res, ch, label_dim=0, use_fp16=False, sigma_min=0.02, sigma_max=100):
        super().__init__(res, ch, label_dim, use_fp16)
        self.sigma_min, self.sigma_max = sigma_min, sigma_max

    def coefs(self, s):
        return 1, s, 1, (0.5 * s).log()


class iDDPMPrecond(_Official):  # noqa: N801
    def __init__(self, res, ch, label_dim=0, use_fp16=False, C_1=0.001, C_2=0.008, M=1000):
        super().__init__(res, ch, label_dim, use_fp16, out_ch=2 * ch)
        self.C_1, self.C_2, self.M = C_1, C_2, M
        u = torch.zeros(M + 1)  # float32, as the official table
        for j in range(M, 0, -1):
            u[j - 1] = (
                (u[j] ** 2 + 1) / (self.alpha_bar(j - 1) / self.alpha_bar(j)).clip(min=C_1) - 1
            ).sqrt()
        self.register_buffer("u", u)
        self.sigma_min, self.sigma_max = float(u[M - 1]), float(u[0])

    def alpha_bar(self, j):
        j = torch.as_tensor(j)
        return (0.5 * math.pi * j / self.M / (self.C_2 + 1)).sin() ** 2

    def round_sigma(self, sigma, return_index=False):
        sigma = torch.as_tensor(sigma)
        index = torch.cdist(sigma.to(torch.float32).reshape(1, -1, 1), self.u.reshape(1, -1, 1)).argmin(2)
        return index if return_index else self.u[index.flatten()].to(sigma.dtype)

    def coefs(self, s):
        return (
            1,
            -s,
            1 / (s**2 + 1).sqrt(),
            self.M - 1 - self.round_sigma(s, return_index=True).to(torch.float32),
        )


class Precond(nn.Module):
    """Shaped like NVlabs/edm2's preconditioner: EDM's coefficients, the inner network is `unet`,
    no sigma range attributes, log-variance head ignored here."""

    def __init__(self, res, ch, label_dim=0, use_fp16=True, sigma_data=0.5):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim, self.use_fp16 = res, ch, label_dim, use_fp16
        self.sigma_data = sigma_data
        self.unet = TinyUNet(ch, label_dim)

    def forward(self, x, sigma, class_labels=None, force_fp32=False):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim])
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        sd = self.sigma_data
        c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in, c_noise = 1 / (sd**2 + sigma**2).sqrt(), sigma.flatten().log() / 4
        return c_skip * x + c_out * self.unet(c_in * x, c_noise, class_labels).to(torch.float32)


KINDS = {
    "EDMPrecond": (EDMPrecond, precond.EDMPrecond),
    "VPPrecond": (VPPrecond, precond.VPPrecond),
    "VEPrecond": (VEPrecond, precond.VEPrecond),
    "iDDPMPrecond": (iDDPMPrecond, precond.iDDPMPrecond),
}


def _official(kind, label_dim=0, **kw):
    torch.manual_seed(3)
    return KINDS[kind][0](8, 3, label_dim=label_dim, **kw).eval().requires_grad_(False)


@pytest.mark.parametrize("label_dim", [0, 5])
@pytest.mark.parametrize("kind", list(KINDS))
def test_from_edm_matches_official_module(kind, label_dim):
    net = _official(kind, label_dim)
    pre = from_edm(net)
    assert type(pre) is KINDS[kind][1]
    assert pre.dtype == torch.float32 and pre.label_dim == label_dim
    # the official VP range is float32 exp(t)-1 at t ~ 1e-6 (0.000977 for 0.001): edmfast's is exact
    assert pre.sigma_min == pytest.approx(net.sigma_min, rel=3e-2 if kind == "VPPrecond" else 1e-6)
    assert pre.sigma_max == pytest.approx(net.sigma_max, rel=1e-6) or math.isinf(net.sigma_max)
    noise = torch.randn(4, 3, 8, 8)
    cond = {}
    if label_dim:
        cond = {"class_labels": torch.nn.functional.one_hot(torch.tensor([0, 3, 1, 4]), label_dim).float()}
    # the official module as a plain denoiser (unfused) vs the fused preconditioner, same schedule
    sig = edmfast.karras_sigmas(8, max(0.002, pre.sigma_min), min(80.0, pre.sigma_max))
    sig = torch.cat([pre.round_sigma(sig[:-1]).to(torch.float64), sig[-1:]])
    plain = edmfast.sample(net, noise, sig, cond=cond, backend="torch")
    fused = edmfast.sample(pre, noise, sig, cond=cond, backend="cpu")
    ref = reference.sample(net, noise.double(), sig, cond=cond)
    assert rel_err(fused, ref) < RUN_TOL
    assert rel_err(plain, ref) < RUN_TOL
    # the denoiser itself agrees at every level
    for s in sig[:-1].tolist():
        d_off = net(noise, torch.full((4,), s), **cond)
        d_ours = pre(noise, s, **cond)
        assert rel_err(d_ours, d_off) < 1e-5, s


@pytest.mark.parametrize("label_dim", [0, 5])
def test_from_edm2_precond(label_dim):
    torch.manual_seed(3)
    net = Precond(8, 3, label_dim=label_dim, sigma_data=0.5).eval().requires_grad_(False)
    pre = from_edm(net, dtype=torch.float32)
    # use_fp16 on the CPU: float32, as the official forward runs there
    assert type(pre) is precond.EDMPrecond and pre.sigma_data == 0.5 and from_edm(net).dtype == torch.float32
    noise = torch.randn(3, 3, 8, 8)
    cond = {"class_labels": torch.eye(5)[[0, 2, 4]]} if label_dim else {}
    sig = edmfast.karras_sigmas(8)
    ref = reference.sample(net, noise.double(), sig, cond=cond)
    assert rel_err(edmfast.sample(pre, noise, sig, cond=cond, backend="cpu"), ref) < RUN_TOL


def test_from_edm_labels_missing_uses_zero_row():
    net = _official("EDMPrecond", label_dim=5)
    pre = from_edm(net)
    x = torch.randn(2, 3, 8, 8)
    assert rel_err(pre(x, 1.3), net(x, torch.full((2,), 1.3))) < 1e-6


def test_from_edm_settings_and_fp16():
    net = _official("VPPrecond", beta_d=15.0, beta_min=0.2, M=500, epsilon_t=1e-4, use_fp16=True)
    pre = from_edm(net)
    assert (pre.beta_d, pre.beta_min, pre.M) == (15.0, 0.2, 500)
    assert pre.dtype == torch.float32  # use_fp16, but on the CPU
    assert from_edm(net, dtype=torch.float16).dtype == torch.float16
    assert from_edm({"ema": net}).beta_d == 15.0
    ve = from_edm(_official("VEPrecond", sigma_min=0.05, sigma_max=50.0))
    assert (ve.sigma_min, ve.sigma_max) == (0.05, 50.0)
    edm = from_edm(_official("EDMPrecond", sigma_data=0.6, sigma_min=0.01, sigma_max=40.0))
    assert (edm.sigma_data, edm.sigma_min, edm.sigma_max) == (0.6, 0.01, 40.0)
    dd = from_edm(_official("iDDPMPrecond", C_1=0.002, C_2=0.01, M=300))
    assert dd.M == 300 and dd.model.unet is not None
    assert isinstance(dd.model, OfficialUNet)


def test_from_edm_fp16_network_samples():
    # use_fp16: the official forward runs float16 on CUDA only. On the CPU from_edm's default
    # follows it (float32: agreement to float32 rounding); an explicit float16 costs ~1e-3
    net = _official("EDMPrecond", label_dim=5, use_fp16=True)
    noise = torch.randn(2, 3, 8, 8)
    cond = {"class_labels": torch.eye(5)[:2]}
    official = edmfast.sample(net, noise, num_steps=8, cond=cond, backend="cpu")
    default = edmfast.sample(from_edm(net), noise, num_steps=8, cond=cond, backend="cpu")
    half = edmfast.sample(from_edm(net, dtype=torch.float16), noise, num_steps=8, cond=cond, backend="cpu")
    assert rel_err(default, official) < TOL[torch.float32]
    # float16 inputs are measurably worse (the old default on the CPU): the check can tell them apart
    assert 10 * rel_err(default, official) < rel_err(half, official) < TOL[torch.float16]


def test_from_edm_default_dtype_follows_the_networks_device(monkeypatch):
    # where the module's tensors are on CUDA, a use_fp16 network runs float16, as the official
    # forward does there (the device lookup is replaced: this machine may have no GPU)
    from edmfast import edm

    monkeypatch.setattr(edm, "_device_of", lambda net: torch.device("cuda"))
    assert from_edm(_official("EDMPrecond", use_fp16=True)).dtype == torch.float16
    assert from_edm(_official("EDMPrecond", use_fp16=False)).dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_from_edm_fp16_on_cuda():
    net = _official("EDMPrecond", use_fp16=True).cuda()
    assert from_edm(net).dtype == torch.float16
    assert from_edm(net.cpu()).dtype == torch.float32


def test_from_edm_rejects_other_objects():
    with pytest.raises(TypeError, match="official NVlabs/edm"):
        from_edm(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="'ema'"):
        from_edm({"net": 1})

    class EDMPrecond(nn.Module):  # the name without the attributes
        pass

    with pytest.raises(TypeError, match="lacks the official attribute"):
        from_edm(EDMPrecond())


def test_load_network(tmp_path):
    net = _official("VEPrecond")
    path = tmp_path / "net.pkl"
    with open(path, "wb") as f:
        pickle.dump({"ema": net}, f)
    got = load_network(path)
    assert isinstance(got, VEPrecond) and not got.training
    assert not any(p.requires_grad for p in got.parameters())
    with pytest.raises(FileNotFoundError):
        load_network(tmp_path / "missing.pkl")
    with pytest.raises(ValueError, match="local file or an http"):
        load_network("ftp://example.com/x.pkl")


def _network_bytes() -> bytes:
    return pickle.dumps({"ema": _official("VEPrecond")})


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"", r"empty \(0 bytes"),
        (b"<html><body>404 Not Found</body></html>\n", "a text file, not a pickle"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n", "Git LFS pointer"),
        (b"PK\x03\x04" + bytes(60), "zip archive"),
        ("half", "truncated"),
        ("all but the last byte", "truncated"),
        (b"\x80\x04\xff\xff", "not a pickle"),
    ],
    ids=["empty", "html", "lfs-pointer", "zip", "half", "last-byte-missing", "bad-opcode"],
)
def test_load_network_names_the_path_and_the_problem(tmp_path, content, reason):
    # issue 22 item 8: not a bare EOFError / UnpicklingError
    whole = _network_bytes()
    if content == "half":
        content = whole[: len(whole) // 2]
    elif content == "all but the last byte":
        content = whole[:-1]
    path = tmp_path / "damaged.pkl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=reason) as e:
        load_network(path)
    assert isinstance(e.value, edmfast.edm.NetworkFileError) and str(path) in str(e.value)
    assert edmfast.edm.pickle_problem(path) is not None


def test_pickle_problem_accepts_a_whole_pickle(tmp_path):
    path = tmp_path / "net.pkl"
    path.write_bytes(_network_bytes())
    assert edmfast.edm.pickle_problem(path) is None


def test_load_network_names_the_missing_official_code(tmp_path):
    # a pickle referring to a class in dnnlib (which is not importable here)
    path = tmp_path / "official.pkl"
    path.write_bytes(b"\x80\x04\x95\x00\x00\x00\x00\x00\x00\x00\x00\x8c\x06dnnlib\x8c\x08EasyDict\x93)\x81.")
    with pytest.raises(ImportError, match="sys.path"):
        load_network(path)
