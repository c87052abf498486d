import os
import sys
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"

# Small and deterministic everywhere: 2-core CI machines, no GPU.
torch.set_num_threads(min(2, os.cpu_count() or 1))

# A tiny but complete training run (timm's test encoder, 64x64 synthetic images).
TINY_TRAIN = [
    "--encoder", "test_resnet", "--crop", "64", "64", "--batch-size", "4",
    "--set", "synthetic_size=[64, 64]", "--set", "synthetic_train_len=32",
    "--set", "eval_batch_size=50", "--set", "log_every=2",
]


def run_ctxseg(args, **kw):
    """Run ``python -m ctxseg ARGS`` in a subprocess from the repo root."""
    import subprocess

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "ctxseg", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, **kw)


def assert_printed_ratio(printed: str, num: float, den: float, step: float) -> None:
    """``printed`` (``"2.50x"``) is ``num / den`` where both were printed rounded to ``step``
    (0.1 for ``{:.1f}``) and the ratio to 0.01: within the interval rounding allows."""
    assert printed.endswith("x"), printed
    r = float(printed[:-1])
    lo = (num - step / 2) / (den + step / 2)
    hi = (num + step / 2) / (den - step / 2) if den > step / 2 else float("inf")
    assert lo - 0.005 <= r <= hi + 0.005, f"{printed} is not {num} / {den} (printed to {step})"


def skip_unless_required(flag: str, reason: str) -> None:
    """Skip with ``reason``, or fail with it where ``flag`` is set to 1 (CI sets the flags of what
    it provides, in .ci/run, so that a test it expects to run cannot pass by skipping)."""
    if os.environ.get(flag) == "1":
        pytest.fail(f"{flag}=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def require_shared_camvid() -> Path:
    """The real CamVid copy of developers' checkouts (../shared/data/camvid); a skip elsewhere, a
    failure where ``CTXSEG_REQUIRE_CAMVID=1`` (.ci/run sets it where ../shared exists)."""
    root = SHARED / "data" / "camvid"
    if not (root / "train").is_dir():
        skip_unless_required("CTXSEG_REQUIRE_CAMVID", f"{root} is not present (only developers' checkouts have it)")
    return root


@pytest.fixture
def shared_camvid():
    return require_shared_camvid()


# ------------------------------------------------------------------------------------------------
# A local HTTP server for the download tests (no network is needed or used).
HTTP_TIMEOUT = 5  # seconds per socket operation; a hung test fails instead of blocking the suite
PAYLOAD = bytes(range(256)) * 40


class _Handler(SimpleHTTPRequestHandler):
    """Serves a folder, records every request, and offers a truncating ``/truncated`` path (it
    announces ``len(PAYLOAD)`` bytes and sends 100)."""

    def do_GET(self) -> None:
        self.server.hits.append(self.path)
        if self.path == "/truncated":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD[:100])
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, format: str, *args) -> None:  # keep pytest output clean
        pass


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    """Serves ``tmp_path / "www"`` on 127.0.0.1: ``www`` (the folder), ``url``, ``hits``."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    www = tmp_path / "www"
    www.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Handler, directory=str(www)))
    httpd.hits = []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        yield SimpleNamespace(www=www, url=f"http://127.0.0.1:{httpd.server_address[1]}", hits=httpd.hits)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(HTTP_TIMEOUT)


def leftovers(folder: Path) -> list[str]:
    """Sorted names in ``folder`` (what a failed download must not leave behind)."""
    return sorted(p.name for p in folder.iterdir())
