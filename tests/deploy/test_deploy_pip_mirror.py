"""deploy/docker/pip_mirror.py: the host's pip settings become build args (env over `install` over `global`),
local indexes and wheel folders are served on loopback under stable URLs with nothing else reachable, missing paths
are dropped, and the CPU torch pin is taken from a local wheel only where one lies there. Plus build_local.sh
parses (`bash -n`)."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from tests.support.deploy import DEPLOY

SPEC = importlib.util.spec_from_file_location("pip_mirror", DEPLOY / "docker" / "pip_mirror.py")
pm = sys.modules[SPEC.name] = importlib.util.module_from_spec(SPEC)  # registered: its dataclasses look it up
SPEC.loader.exec_module(pm)

CONFIG_LIST = """global.cert='/etc/ssl/certs/ca.crt'
global.extra-index-url='file:///srv/pypi/simple https://mirror.example/simple'
global.find-links='/srv/wheels'
global.index-url='https://global.example/simple'
install.index-url='https://install.example/simple'
global.constraint='/etc/pip/constraints.txt'
:env:.find-links='/env/wheels'
"""


def test_settings_precedence():
    got = pm.host_settings(CONFIG_LIST, {"PIP_TRUSTED_HOST": "mirror.example", "PIP_CERT": ""})
    assert got == {"cert": "/etc/ssl/certs/ca.crt",
                   "extra-index-url": "file:///srv/pypi/simple https://mirror.example/simple",
                   "find-links": "/env/wheels", "index-url": "https://install.example/simple",
                   "trusted-host": "mirror.example"}
    assert pm.host_settings("", {"PIP_INDEX_URL": "https://env.example/simple"}) == {
        "index-url": "https://env.example/simple"}


@pytest.fixture
def host(tmp_path):
    """A local index (simple/ linking to ../../files/) and a wheel folder holding torch's CPU build."""
    (tmp_path / "pypi" / "simple" / "demo").mkdir(parents=True)
    (tmp_path / "pypi" / "files").mkdir()
    (tmp_path / "pypi" / "files" / "demo-1.0-py3-none-any.whl").write_bytes(b"wheel")
    (tmp_path / "pypi" / "simple" / "demo" / "index.html").write_text(
        '<a href="../../files/demo-1.0-py3-none-any.whl">demo-1.0-py3-none-any.whl</a>')
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl").write_bytes(b"torch")
    (tmp_path / "secret.txt").write_text("not served")
    return tmp_path


def test_build_args_rewrite_local_locations(host):
    settings = {"extra-index-url": f"file://{host}/pypi/simple https://mirror.example/simple {host}/gone",
                "find-links": str(host / "wheels"), "cert": "/etc/ssl/certs/ca.crt", "trusted-host": "mirror.example"}
    mirror = pm.Mirror()
    args = pm.build_args(settings, mirror, "torch==2.13.0")
    assert args == {
        "PIP_EXTRA_INDEX_URL": "http://127.0.0.1:{port}/0/simple/ https://mirror.example/simple",
        "PIP_FIND_LINKS": "http://127.0.0.1:{port}/1/", "PIP_CERT": "/etc/ssl/certs/ca.crt",
        "PIP_TRUSTED_HOST": "mirror.example", "CPU_TORCH": "torch==2.13.0+cpu", "CPU_TORCH_INDEX": ""}
    assert mirror.roots == [host / "pypi", host / "wheels"] and mirror.dropped == [f"{host}/gone"]


def test_no_local_torch_keeps_the_dockerfile_defaults(host):
    args = pm.build_args({"find-links": str(host / "wheels")}, pm.Mirror(), "torch==2.14.0")
    assert "CPU_TORCH" not in args and "CPU_TORCH_INDEX" not in args
    assert pm.build_args({}, pm.Mirror(), "torch==2.13.0") == {}


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def test_serves_only_the_published_folders(host):
    server = pm.serve([host / "pypi", host / "wheels"], 0)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        status, page = get(f"{base}/0/simple/demo/")
        assert status == 200 and b"../../files/demo-1.0-py3-none-any.whl" in page
        assert get(f"{base}/0/files/demo-1.0-py3-none-any.whl") == (200, b"wheel")  # the index's relative link
        status, listing = get(f"{base}/1/")
        assert status == 200 and b"torch-2.13.0%2Bcpu-cp311" in listing
        for path in ("/0/../secret.txt", "/0/%2e%2e/secret.txt", "/2/", "/secret.txt", "/x/secret.txt"):
            assert get(base + path)[0] == 404, path
    finally:
        server.shutdown()
        server.server_close()


def test_build_script_parses():
    res = subprocess.run(["bash", "-n", str(DEPLOY / "docker" / "build_local.sh")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
