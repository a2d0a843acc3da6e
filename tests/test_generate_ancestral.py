"""``edmfast generate --sampler ancestral``: the built-in epsilon model, per-seed images, resume, errors.

The built-in model is the shapes data set's exact denoiser in epsilon form (`ShapesEpsilon`), so a
converged ancestral sampler lands on training images; measured: 16 seeds at 20 leading / trailing
steps all land exactly (nearest RMS 0.0 levels), so the bound below is loose.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edmfast import cli
from edmfast.data import nearest_rms, shapes_dataset
from edmfast.generate import ShapesEpsilon, ancestral_setup

STEPS = ["--steps", "20"]


def _run(outdir: Path, seeds: str, batch: int, *extra: str) -> int:
    return cli.main(
        ["generate", "--sampler", "ancestral", "--seeds", seeds, "--batch", str(batch)]
        + ["--outdir", str(outdir), "--no-progress", *STEPS, *extra]
    )


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.suffix == ".png"}


def _images(d: Path) -> torch.Tensor:
    arrays = [np.array(Image.open(p)) for p in sorted(d.glob("*.png"))]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).double() / 127.5 - 1


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err  # one line
    return err


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> dict[str, bytes]:
    d = tmp_path_factory.mktemp("anc")
    assert _run(d, "0-5", 3) == 0
    return _files(d)


def test_builtin_lands_on_shapes(baseline, tmp_path):
    assert sorted(baseline) == [f"{s:06d}.png" for s in range(6)]
    for name, data in baseline.items():
        (tmp_path / name).write_bytes(data)
    rms = nearest_rms(_images(tmp_path), shapes_dataset(32))
    assert float(rms.max()) <= 2.0, rms  # 8-bit levels; measured 0.0
    assert len(set(baseline.values())) >= 4  # distinct seeds give different images


def test_builtin_manifest_records_the_sampler(baseline, tmp_path):
    assert _run(tmp_path, "0-1", 2) == 0
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["model"] == "edmfast.generate:default_ancestral_model"
    s = m["sampler"]
    assert s["kind"] == "ancestral" and s["variance"] == "fixed_small" and s["num_steps"] == 20
    assert s["spacing"] == "leading" and s["clip_denoised"] is True and s["eta"] is None
    assert s["betas"].startswith("float64 [1000] sha256=")


def test_batch_invariance(baseline, tmp_path):
    assert _run(tmp_path, "0-5", 1) == 0
    assert _files(tmp_path) == baseline


def test_resume_skips_and_refuses_other_settings(baseline, tmp_path, capsys):
    assert _run(tmp_path, "0-2", 3) == 0
    assert _run(tmp_path, "0-5", 3) == 0  # resume: 3 skipped, 3 new
    assert _files(tmp_path) == baseline
    capsys.readouterr()
    assert _run(tmp_path, "6-7", 2, "--spacing", "trailing") == 2
    assert "made with --spacing leading (this run: --spacing trailing)" in _error(capsys)
    # the Heun sampler into an ancestral folder, and the other way round
    heun = ["generate", "--seeds", "6", "--outdir", str(tmp_path), "--no-progress", "--steps", "4"]
    assert cli.main(heun) == 2
    assert (
        "made with --sampler ancestral, --model edmfast.generate:default_ancestral_model (this run: "
        in _error(capsys)
    )
    h = tmp_path / "heun"
    assert cli.main([*heun[:3], "--outdir", str(h), *heun[5:]]) == 0
    assert _run(h, "6", 1) == 2
    assert (
        "made with --sampler heun, --model edmfast.data:default_model (this run: --sampler ancestral"
        in _error(capsys)
    )


MODEL = """
import torch
from edmfast.generate import ShapesEpsilon


class TwoC(torch.nn.Module):
    # iDDPM-style output: epsilon, then v in [-1, 1] (learned_range); cosine betas by name
    num_train_timesteps = 1000
    beta_schedule = "cosine"
    image_shape = (3, 32, 32)

    def __init__(self, learned):
        super().__init__()
        self.inner = ShapesEpsilon()
        self.learned = learned

    def forward(self, x, t):
        eps = self.inner(x, t)
        return torch.cat([eps, torch.full_like(eps, 0.5)], 1) if self.learned else eps


def two_c():
    return TwoC(True)


def one_c():
    return TwoC(False), (3, 32, 32)


class Labelled(torch.nn.Module):
    # class-conditional in name only: the labels arrive (cond and uncond rows) and are ignored
    label_dim = 3
    image_shape = (3, 32, 32)
    variance = "fixed_small"
    calls = []

    def __init__(self):
        super().__init__()
        self.inner = ShapesEpsilon()
        self.betas = self.inner.betas

    def forward(self, x, t, class_labels):
        Labelled.calls.append(tuple(class_labels.shape))
        return self.inner(x, t)


def labelled():
    return Labelled()
"""


@pytest.fixture
def user_model(tmp_path, monkeypatch) -> Path:
    (tmp_path / "anc_user_model.py").write_text(textwrap.dedent(MODEL))
    monkeypatch.chdir(tmp_path)  # a user's --model module may live in the current folder
    return tmp_path


def test_user_model_learned_range(user_model):
    out = user_model / "out"
    assert _run(out, "0-3", 2, "--model", "anc_user_model:two_c") == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["sampler"]["variance"] == "learned_range"  # the default for a model without the attribute
    assert m["model"] == "anc_user_model:two_c"
    rms = nearest_rms(_images(out), shapes_dataset(32))
    assert float(rms.max()) <= 2.0, rms
    # the same model with its fixed variance (C channels) is refused with the option named
    other = user_model / "other"
    assert _run(other, "0-1", 2, "--model", "anc_user_model:two_c", "--variance", "fixed_small") == 2


def test_c_channel_model_needs_a_fixed_variance(user_model, capsys):
    out = user_model / "out"
    assert _run(out, "0-1", 2, "--model", "anc_user_model:one_c") == 2
    err = _error(capsys)
    assert "--variance learned_range:" in err and "fixed_small" in err
    assert not (out / "manifest.json").exists()  # nothing is written before the first batch
    assert _run(out, "0-1", 2, "--model", "anc_user_model:one_c", "--variance", "fixed_small") == 0


def test_class_labels_and_guidance(user_model):
    # the labels are drawn from each seed's generator after its latents, as on the Heun path; a
    # model that ignores them gives the same images with and without guidance (cond == uncond)
    a, b = user_model / "a", user_model / "b"
    assert _run(a, "0-2", 3, "--model", "anc_user_model:labelled") == 0
    assert _run(b, "0-2", 3, "--model", "anc_user_model:labelled", "--guidance", "3") == 0
    assert _files(a) == _files(b)
    assert json.loads((b / "manifest.json").read_text())["sampler"]["guidance_scale"] == 3.0
    import anc_user_model  # type: ignore[import-not-found]

    assert (3, 3) in anc_user_model.Labelled.calls and (6, 3) in anc_user_model.Labelled.calls


def test_fused_noise_is_batch_invariant(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _run(a, "0-3", 4, "--noise-mode", "fused") == 0
    assert _run(b, "0-3", 1, "--noise-mode", "fused") == 0
    assert _files(a) == _files(b)
    rms = nearest_rms(_images(a), shapes_dataset(32))
    assert float(rms.max()) <= 2.0, rms


@pytest.mark.parametrize(
    ("extra", "flag"),
    [
        (["--spacing", "sideways"], "--spacing must be one of"),
        (["--steps", "2000"], "--steps 2000 exceeds"),
        (["--eta", "-1"], "--eta must be"),
        (["--churn", "5"], "--churn applies to --sampler heun only"),
        (["--solver", "euler"], "--solver applies to --sampler heun only"),
        (["--guidance", "2"], "--guidance needs a class-conditional model"),
    ],
)
def test_bad_option_is_one_line(tmp_path, capsys, extra, flag):
    assert _run(tmp_path / "x", "0", 1, *extra) == 2
    assert flag in _error(capsys)
    assert not (tmp_path / "x" / "manifest.json").exists()


def test_ancestral_options_refused_with_heun(tmp_path, capsys):
    for extra, flag in ((["--eta", "0"], "--eta"), (["--no-clip"], "--clip/--no-clip")):
        args = ["generate", "--seeds", "0", "--outdir", str(tmp_path), "--no-progress", *extra]
        assert cli.main(args) == 2
        assert f"{flag} applies to --sampler ancestral only" in _error(capsys)


def test_bad_variance_choice_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _run(tmp_path, "0", 1, "--variance", "wide")
    assert e.value.code == 2
    assert "--variance" in _error(capsys)


def test_ancestral_setup_contract():
    m = ShapesEpsilon()
    betas, opts = ancestral_setup(m, "x:y", {"num_steps": None, "variance": None, "eta": None})
    assert betas.dtype == torch.float64 and betas.numel() == 1000
    assert opts == {
        "num_steps": 250,
        "variance": "fixed_small",
        "prediction_type": "epsilon",
        "clip_denoised": True,
        "eta": None,
    }

    class Bad:
        betas = [0.1, 2.0]

    with pytest.raises(ValueError, match="--model 'x:y': its training betas"):
        ancestral_setup(Bad(), "x:y", {})


def test_shapes_epsilon_is_the_exact_noise_at_low_noise():
    # x_t = sqrt(abar) y + sqrt(1 - abar) eps with y a training image: at small t the ideal
    # denoiser returns y, so the model returns eps
    m = ShapesEpsilon()
    y = shapes_dataset(32)[:2]
    eps = torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 10])
    a = m.abar[t].reshape(-1, 1, 1, 1)
    x = (a.sqrt() * y + (1 - a).sqrt() * eps).float()
    assert torch.allclose(m(x, t), eps.float(), atol=1e-3)
