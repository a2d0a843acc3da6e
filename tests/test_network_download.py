"""``load_network`` / ``--network`` with http(s) URLs (issue 23 item 3), against a local server.

A `http.server` on 127.0.0.1 in a thread serves a small network pickle, a cut-off transfer, an
HTML page and a 404; a closed port stands in for being offline. Nothing leaves the machine.
"""

from __future__ import annotations

import http.server
import json
import os
import pickle
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edmfast import edm
from edmfast.edm import DownloadError, NetworkFileError, download_network, load_network, network_cache_dir

ROOT = Path(__file__).resolve().parent.parent

# the stand-in official network lives in a module file of its own, so that a subprocess can
# unpickle it too (its folder goes on PYTHONPATH)
NETDEF = '''
import torch
from torch import nn


class UNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x, noise_labels, class_labels, augment_labels=None):
        return torch.tanh(self.conv(x) + noise_labels.reshape(-1, 1, 1, 1))


class EDMPrecond(nn.Module):
    """The official EDMPrecond's attributes and forward (EDM Table 1)."""

    def __init__(self):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim, self.use_fp16 = 8, 3, 0, False
        self.sigma_min, self.sigma_max, self.sigma_data = 0.0, float("inf"), 0.5
        self.model = UNet()

    def forward(self, x, sigma, class_labels=None, force_fp32=False):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        sd = self.sigma_data
        c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in, c_noise = 1 / (sd**2 + sigma**2).sqrt(), sigma.log() / 4
        return c_skip * x + c_out * self.model(c_in * x, c_noise.flatten(), None)
'''


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, bytes, int | None]] = {}
    hits: dict[str, int] = {}

    def do_GET(self):  # noqa: N802 - http.server's name
        self.hits[self.path] = self.hits.get(self.path, 0) + 1
        if self.path not in self.routes:
            self.send_error(404, "Not Found")
            return
        status, body, announced = self.routes[self.path]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body) if announced is None else announced))
        self.end_headers()
        self.wfile.write(body)  # with a larger announced length: the connection closes early

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def netdef(tmp_path_factory):
    folder = tmp_path_factory.mktemp("netdef")
    (folder / "edmfast_test_netdef.py").write_text(NETDEF)
    sys.path.insert(0, str(folder))
    try:
        import edmfast_test_netdef

        torch.manual_seed(0)
        net = edmfast_test_netdef.EDMPrecond().eval()
        yield folder, pickle.dumps({"ema": net})
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("edmfast_test_netdef", None)


@pytest.fixture
def server(netdef):
    _, data = netdef
    handler = type("Handler", (_Handler,), {"routes": {}, "hits": {}})
    handler.routes.update(
        {
            "/nets/edm-tiny.pkl": (200, data, None),
            "/nets/cut.pkl": (200, data[: len(data) // 2], len(data)),
            "/nets/page.pkl": (200, b"<html><body>Sign in to download</body></html>\n", None),
            "/nets/short.pkl": (200, data[: len(data) // 2], None),
        }
    )
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()


def _cache_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith(".lock")) if folder.exists() else []


def test_download_once_verify_and_reuse(server, tmp_path, capsys):
    base, handler = server
    url = f"{base}/nets/edm-tiny.pkl"
    cache = tmp_path / "cache"
    net = load_network(url, cache_dir=cache)
    assert type(net).__name__ == "EDMPrecond" and not net.training
    assert "edm-tiny.pkl" in capsys.readouterr().err  # the tqdm bar names the file
    path = download_network(url, cache_dir=cache)
    assert handler.hits["/nets/edm-tiny.pkl"] == 1  # reused, not fetched again
    assert path.name.endswith("-edm-tiny.pkl") and path.parent == cache
    record = Path(f"{path}.sha256").read_text()
    assert record.split() == [edm._sha256(path), path.name]  # sha256sum -c format
    assert _cache_files(cache) == sorted([path.name, f"{path.name}.sha256"])  # no temporaries left
    # a cached file whose content changed is fetched again
    damaged = bytearray(path.read_bytes())
    damaged[-5] ^= 0xFF
    path.write_bytes(bytes(damaged))
    assert download_network(url, cache_dir=cache, progress=False) == path
    assert handler.hits["/nets/edm-tiny.pkl"] == 2 and edm.pickle_problem(path) is None
    # so is one without its record (a kill between the rename and the record)
    Path(f"{path}.sha256").unlink()
    download_network(url, cache_dir=cache, progress=False)
    assert handler.hits["/nets/edm-tiny.pkl"] == 3 and Path(f"{path}.sha256").is_file()


@pytest.mark.parametrize(
    ("route", "error", "must"),
    [
        ("/nets/cut.pkl", DownloadError, "cut off"),
        ("/nets/short.pkl", NetworkFileError, "truncated"),
        ("/nets/page.pkl", NetworkFileError, "a text file, not a pickle"),
        ("/nets/missing.pkl", DownloadError, "HTTP 404"),
    ],
    ids=["connection-closed-early", "complete-but-cut-pickle", "html-page", "404"],
)
def test_failed_downloads_name_the_url_and_keep_nothing(server, tmp_path, route, error, must):
    base, _ = server
    url = f"{base}{route}"
    cache = tmp_path / "cache"
    with pytest.raises(error, match=must) as e:
        load_network(url, cache_dir=cache, progress=False)
    assert url in str(e.value)  # the whole URL, not a path-mangled 'http:/...'
    assert _cache_files(cache) == []


def test_offline_is_a_clear_error(tmp_path):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/edm-cifar10-32x32-cond-vp.pkl"
    with pytest.raises(DownloadError, match="offline") as e:
        download_network(url, cache_dir=tmp_path, progress=False)
    assert url in str(e.value)


def test_cache_folder_choice(monkeypatch, tmp_path):
    monkeypatch.delenv(edm.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert network_cache_dir() == tmp_path / "xdg" / "edmfast" / "networks"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert network_cache_dir() == Path.home() / ".cache" / "edmfast" / "networks"
    monkeypatch.setenv(edm.CACHE_ENV, str(tmp_path / "env"))
    assert network_cache_dir() == tmp_path / "env"
    assert network_cache_dir(tmp_path / "arg") == tmp_path / "arg"
    # the URL's own file name stays visible; two URLs never share a file
    a, b = edm.cached_name("https://x/a/net.pkl"), edm.cached_name("https://y/a/net.pkl")
    assert a.endswith("-net.pkl") and b.endswith("-net.pkl") and a != b


def _run_cli(netdef_folder: Path, cache: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(netdef_folder)]),
        edm.CACHE_ENV: str(cache),
    }
    return subprocess.run(
        [sys.executable, "-m", "edmfast", "generate", *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def test_cli_network_url_gives_the_local_files_images(server, netdef, tmp_path):
    from edmfast.generate import generate

    base, handler = server
    folder, data = netdef
    url = f"{base}/nets/edm-tiny.pkl"
    common = ["--seeds", "0-2", "--steps", "4", "--churn", "5"]
    out = _run_cli(folder, tmp_path / "cache", "--network", url, "--outdir", str(tmp_path / "url"), *common)
    assert out.returncode == 0, out.stderr
    assert handler.hits["/nets/edm-tiny.pkl"] == 1
    local = tmp_path / "edm-tiny.pkl"
    local.write_bytes(data)
    options = {"num_steps": 4, "s_churn": 5.0}
    sys.path.insert(0, str(folder))
    try:
        generate(
            [0, 1, 2], tmp_path / "file", network=local, options=options, progress=False, log=lambda s: None
        )
    finally:
        sys.path.remove(str(folder))
    url_manifest = json.loads((tmp_path / "url" / "manifest.json").read_text())
    assert url_manifest == json.loads((tmp_path / "file" / "manifest.json").read_text())
    for seed in range(3):
        a = np.asarray(Image.open(tmp_path / "url" / f"{seed:06d}.png"))
        b = np.asarray(Image.open(tmp_path / "file" / f"{seed:06d}.png"))
        assert np.array_equal(a, b)


def test_cli_network_url_errors_are_one_line(server, netdef, tmp_path):
    base, _ = server
    folder, _ = netdef
    for route, must in (("/nets/missing.pkl", "HTTP 404"), ("/nets/page.pkl", "not send a network pickle")):
        url = f"{base}{route}"
        out = _run_cli(
            folder,
            tmp_path / "cache",
            "--network",
            url,
            "--outdir",
            str(tmp_path / "o"),
            "--seeds",
            "0",
            "--no-progress",
        )
        assert out.returncode == 2
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("edmfast generate: error: --network"), out.stderr
        assert url in lines[0] and must in lines[0] and "http:/1" not in lines[0]
