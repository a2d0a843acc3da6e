"""Official NVlabs/edm ``generate.py`` command lines paste into ``edmfast generate`` (issue 23 item 2).

The options keep their official spellings (``--S_churn``, ``--sigma_min``, ``--disc``, ...), reach
the same sampler configuration, and give the official images: compared with the official loop
(``benchmarks/peers.official_edm_sampler``, EDM Algorithm 2 as the official script runs it) and
with `edmfast.reference.ablation_sample` for the design-space flags, on the built-in shapes model.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edmfast import PerSampleGenerator, cli, reference
from edmfast.data import ShapesDenoiser
from edmfast.generate import _design, image_path, parse_seeds
from edmfast.options import SamplerOptions
from edmfast.solvers import AblationOptions

ROOT = Path(__file__).resolve().parent.parent
CDN = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained"

# the official README's commands, as typed there (the network URLs are only parsed here)
CIFAR = f"{CDN}/edm-cifar10-32x32-cond-vp.pkl"
PY = "python generate.py"
OFFICIAL = {
    "cifar10": f"{PY} --outdir=out --seeds=0-63 --batch=64 --network={CIFAR}",
    "fid-50k": "torchrun --standalone --nproc_per_node=2 generate.py --outdir=fid-tmp --seeds=0-49999 "
    f"--subdirs --network={CIFAR}",
    "imagenet": f"{PY} --outdir=out --seeds=0-63 --batch=64 --steps=256 --S_churn=40 --S_min=0.05 "
    f"--S_max=50 --S_noise=1.003 --network={CDN}/edm-imagenet-64x64-cond-adm.pkl",
    "vp-baseline": f"{PY} --outdir=out --seeds=0-63 --steps=512 --solver=euler --disc=vp --schedule=vp "
    f"--scaling=vp --network={CDN}/baseline/baseline-cifar10-32x32-uncond-vp.pkl",
    "ve-baseline": f"{PY} --outdir=out --seeds=0-63 --solver=euler --disc=ve --schedule=ve --scaling=none "
    f"--sigma_min=0.02 --sigma_max=100 --network={CDN}/baseline/baseline-cifar10-32x32-uncond-ve.pkl",
    "class": f"{PY} --outdir=out --seeds=0-7 --class=3 --network={CIFAR}",
}


def _parse(command: str):
    argv = shlex.split(command)
    argv = argv[argv.index("generate.py") + 1 :]  # `edmfast generate` in place of `python generate.py`
    args = cli.build_parser().parse_args(["generate", *argv])
    return args, cli._generate_options(args)


def _engine(options: dict):
    """(SamplerOptions, AblationOptions or None) as `generate` builds them from the options."""
    options = dict(options)
    design = _design(options, ancestral=False)
    return SamplerOptions.create(**options), design


def test_official_commands_parse_to_the_official_configuration():
    args, options = _parse(OFFICIAL["cifar10"])
    assert args.outdir == "out" and args.seeds == list(range(64)) and args.batch == 64
    assert args.network == CIFAR and not args.subdirs
    opts, design = _engine(options)
    # edm_sampler's defaults: 18 steps, sigma 0.002..80, rho 7, no churn
    assert design is None
    assert (opts.num_steps, opts.sigma_min, opts.sigma_max, opts.rho, opts.solver) == (
        18,
        0.002,
        80.0,
        7.0,
        "heun",
    )
    assert (opts.s_churn, opts.s_tmin, opts.s_tmax, opts.s_noise) == (0.0, 0.0, float("inf"), 1.0)

    args, options = _parse(OFFICIAL["fid-50k"])
    assert args.subdirs and args.seeds == parse_seeds("0-49999")

    args, options = _parse(OFFICIAL["imagenet"])
    opts, design = _engine(options)
    assert design is None and opts.num_steps == 256
    assert (opts.s_churn, opts.s_tmin, opts.s_tmax, opts.s_noise) == (40.0, 0.05, 50.0, 1.003)

    # the design-space flags select ablation_sample with the official ablation_sampler's values
    args, options = _parse(OFFICIAL["vp-baseline"])
    opts, design = _engine(options)
    assert design == AblationOptions(discretization="vp", schedule="vp", scaling="vp")
    assert (opts.num_steps, opts.solver) == (512, "euler")
    args, options = _parse(OFFICIAL["ve-baseline"])
    opts, design = _engine(options)
    assert design == AblationOptions(
        discretization="ve", schedule="ve", scaling="none", sigma_min=0.02, sigma_max=100.0
    )

    args, _ = _parse(OFFICIAL["class"])
    assert args.class_idx == 3 and args.seeds == list(range(8))


def test_official_spellings_are_aliases_of_edmfasts():
    parser = cli.build_parser()
    a = parser.parse_args(["generate", "--outdir", "o", "--S_churn", "7", "--S_min", "0.1", "--S_max", "9"])
    b = parser.parse_args(["generate", "--outdir", "o", "--churn", "7", "--s-tmin", "0.1", "--s-tmax", "9"])
    assert cli._generate_options(a) == cli._generate_options(b)
    a = parser.parse_args(
        ["generate", "--outdir", "o", "--sigma_min=0.01", "--sigma_max=10", "--S_noise=1.1"]
    )
    b = parser.parse_args(
        ["generate", "--outdir", "o", "--sigma-min=0.01", "--sigma-max=10", "--s-noise=1.1"]
    )
    assert cli._generate_options(a) == cli._generate_options(b)


def _run(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "edmfast", "generate", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def _official_pixels(x: torch.Tensor) -> np.ndarray:
    """The official script's conversion of its float64 result: truncation after +128."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _compare(outdir: Path, seeds: list[int], want: np.ndarray, subdirs: bool) -> None:
    got = np.stack([np.asarray(Image.open(image_path(outdir, s, subdirs))) for s in seeds])
    diff = np.abs(got.astype(int) - want.astype(int))
    # float32 vs float64 state: a value on a rounding boundary may land one level off
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99, (diff.max(), (diff == 0).mean())


def test_pasted_official_command_gives_the_official_loops_images(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from peers import OfficialNet, official_edm_sampler
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    seeds = [998, 999, 1000, 1001]  # across a --subdirs boundary
    out = tmp_path / "out"
    command = (
        f"--outdir={out} --seeds=998-1001 --batch=3 --steps=8 --S_churn=30 --S_min=0.05 --S_max=50 "
        "--S_noise=1.003 --subdirs --no-progress"
    )
    res = _run(*shlex.split(command))
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in out.iterdir()) == ["000000", "001000", "manifest.json"]
    assert sorted(p.name for p in (out / "000000").iterdir()) == ["000998.png", "000999.png"]
    assert json.loads((out / "manifest.json").read_text())["layout"] == "subdirs"
    # the official loop on the same model, seeds and per-seed streams (latents, then churn noise)
    rng = PerSampleGenerator(seeds)
    latents = rng.randn([len(seeds), 3, 32, 32])
    x = official_edm_sampler(
        OfficialNet(ShapesDenoiser()), latents, randn_like=rng.randn_like, num_steps=8,
        S_churn=30, S_min=0.05, S_max=50, S_noise=1.003,
    )  # fmt: skip
    _compare(out, seeds, _official_pixels(x), subdirs=True)
    # the same command without --subdirs into that folder is refused, naming the flag
    res = _run(*shlex.split(command.replace(" --subdirs", "")))
    assert res.returncode == 2 and "made with --subdirs (this run: no --subdirs)" in res.stderr


@pytest.mark.parametrize(
    ("flags", "design"),
    [
        (
            "--solver=euler --disc=vp --schedule=vp --scaling=vp",
            {"discretization": "vp", "schedule": "vp", "scaling": "vp"},
        ),
        ("--disc=ve --schedule=ve --S_churn=10 --S_noise=1.01", {"discretization": "ve", "schedule": "ve"}),
        ("--solver=heun --disc=iddpm", {"discretization": "iddpm"}),
    ],
    ids=["vp-baseline", "ve-churn", "iddpm"],
)
def test_design_space_flags_give_ablation_sample_images(tmp_path, flags, design):
    seeds = [0, 1, 2]
    out = tmp_path / "out"
    res = _run(f"--outdir={out}", "--seeds=0-2", "--steps=10", "--no-progress", *shlex.split(flags))
    assert res.returncode == 0, res.stderr
    recorded = json.loads((out / "manifest.json").read_text())["sampler"]["design"]
    assert {k: recorded[k] for k in design} == design
    opts = {"solver": "heun", "s_churn": 0.0, "s_noise": 1.0}
    for token in shlex.split(flags):
        key, _, value = token[2:].partition("=")
        if key in ("solver",):
            opts[key] = value
        elif key in ("S_churn", "S_noise"):
            opts[{"S_churn": "s_churn", "S_noise": "s_noise"}[key]] = float(value)
    rng = PerSampleGenerator(seeds)
    latents = rng.randn([len(seeds), 3, 32, 32])
    x = reference.ablation_sample(
        ShapesDenoiser(), latents.double(), num_steps=10, generator=rng, **design, **opts
    )
    _compare(out, seeds, _official_pixels(x), subdirs=False)


def test_design_flags_are_heun_only(tmp_path):
    res = _run(f"--outdir={tmp_path}", "--seeds=0", "--sampler=ancestral", "--disc=vp", "--no-progress")
    assert res.returncode == 2 and "--disc applies to --sampler heun only" in res.stderr


def test_subdirs_resume_npz_and_cleanup(tmp_path):
    from edmfast.generate import ManifestMismatch, _machine_id, generate

    seeds = [998, 999, 1000, 1001]
    out = tmp_path / "out"
    quiet = {"options": {"num_steps": 3}, "progress": False, "log": lambda s: None, "subdirs": True}
    generate(seeds, out, batch=3, **quiet)
    first = {s: image_path(out, s, True).read_bytes() for s in seeds}
    # a lost image, a damaged one and a dead writer's temporary inside a subfolder
    image_path(out, 999, True).unlink()
    image_path(out, 1001, True).write_bytes(first[1001][:50])
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    stale = out / "001000" / f".edmfast-tmp-{_machine_id()}-{proc.pid}-0123abcd.part"
    stale.write_bytes(b"half")
    stats = generate(seeds, out, batch=3, npz=True, **quiet)
    assert stats["generated"] == 2 and stats["skipped"] == 2 and stats["repaired"] == 1
    assert {s: image_path(out, s, True).read_bytes() for s in seeds} == first
    assert not stale.exists()
    with np.load(out / "images.npz") as z:
        assert z["arr_0"].shape == (4, 32, 32, 3)
    # the flat layout into a --subdirs folder is refused (the images would be looked for elsewhere)
    with pytest.raises(ManifestMismatch, match="made with --subdirs"):
        generate(seeds, out, **{**quiet, "subdirs": False})
