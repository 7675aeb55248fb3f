"""Shared by test_a2pr.py and test_a2pr_sweep.py: every test runs offline (loopback only) and writes nothing outside
its own temporary folders; the helpers both files use (run folders' checkpoints, state comparisons)."""

import atexit
import os
import shutil
import socket
import tempfile
from pathlib import Path

import pytest

# Set before a2pr is imported: matplotlib's cache and a2pr's dataset cache go to a temporary folder, never the home.
_TMP = Path(tempfile.mkdtemp(prefix="a2pr-tests-"))
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)  # the session's caches go with it, not left in /tmp
os.environ.setdefault("MPLCONFIGDIR", str(_TMP / "mpl"))
os.environ["A2PR_DATA_DIR"] = str(_TMP / "data")

import torch  # noqa: E402

import a2pr  # noqa: E402

HERE = Path(__file__).resolve().parent


def checkpoint(run_dir) -> dict:
    """A run folder's checkpoint as it is on disk (plain data, weights_only)."""
    return torch.load(Path(run_dir) / a2pr.RUN_FILES["checkpoint"], map_location="cpu", weights_only=True)


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

LOOPBACK = ("127.0.0.1", "localhost")


@pytest.fixture(autouse=True)
def isolate(tmp_path, monkeypatch):
    """No network beyond loopback, and nothing written outside tmp_path: HOME, the D4RL cache, the Minari root and
    the working directory (MuJoCo writes MUJOCO_LOG.TXT there) all point into it; no Ray cluster from outside."""
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *a, **k):
        if host not in LOOPBACK and host is not None:
            raise OSError(f"test blocked a DNS lookup of {host}")
        return real_getaddrinfo(host, *a, **k)

    def connect(self, address):
        if isinstance(address, tuple) and address[0] not in LOOPBACK:
            raise OSError(f"test blocked a connection to {address}")
        return real_connect(self, address)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", connect)
    for var, sub in [("HOME", "home"), ("D4RL_DATASET_DIR", "d4rl"), ("MINARI_DATASETS_PATH", "minari")]:
        monkeypatch.setenv(var, str(tmp_path / sub))
    monkeypatch.delenv("A2PR_D4RL_MIRROR", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module", autouse=True)
def private_home(tmp_path_factory):
    """Nothing written into the real HOME (Ray's and matplotlib's files, for instance) by the module-scoped runs."""
    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HOME", str(home))
        yield
