"""The host's pip settings as `docker build` arguments, for an image build on this machine.

pip inside the build must see the same package indexes, find-links and CA bundle as pip on the host. Remote URLs pass
as they are; local ones (a find-links folder, a `file://` index) do not exist inside the build, so they are served
read-only over HTTP on 127.0.0.1 for as long as this process runs (the build runs with `--network host`, and pip
treats loopback as a secure origin). Where a local find-links folder holds the CPU build of the pinned torch, the
torch stage takes it from there instead of the public PyTorch index (no multi-GB CUDA build, no second download).

Usage: python3 pip_mirror.py ARGS_FILE [--torch torch==X.Y.Z] [--port N]
Writes one `NAME=value` build argument per line to ARGS_FILE, then serves until SIGTERM (or exits at once when
nothing local needs serving). The port stays the same from build to build where it is free: the URLs are build
arguments, and a changed one would rebuild every layer after it. Standard library only: it runs on the host's
python3 before any venv exists.
"""
from __future__ import annotations

import argparse
import functools
import http.server
import os
import re
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

# pip setting -> the build argument (and pip environment variable) that carries it into the build
SETTINGS = {"index-url": "PIP_INDEX_URL", "extra-index-url": "PIP_EXTRA_INDEX_URL", "find-links": "PIP_FIND_LINKS",
            "trusted-host": "PIP_TRUSTED_HOST", "cert": "PIP_CERT"}
_LINE = re.compile(r"^(?P<section>[^.]*)\.(?P<name>[\w-]+)=(?P<value>.*)$")


def host_settings(config_list: str, environ: dict[str, str]) -> dict[str, str]:
    """{setting: value} as `pip install` on the host sees them: PIP_* variables over the `install` section over
    `global` (the order pip applies). `config_list` is what `pip config list` printed."""
    ranked: dict[str, tuple[int, str]] = {}
    rank = {"global": 0, "install": 1, ":env:": 2}
    for line in config_list.splitlines():
        m = _LINE.match(line.strip())
        if not m or m["name"] not in SETTINGS or m["section"] not in rank:
            continue
        value = m["value"].strip().strip("'\"")
        if rank[m["section"]] >= ranked.get(m["name"], (-1, ""))[0]:
            ranked[m["name"]] = (rank[m["section"]], value)
    out = {name: value for name, (_, value) in ranked.items()}
    out.update({name: environ[var] for name, var in SETTINGS.items() if environ.get(var)})
    return out


def local_path(location: str) -> Path | None:
    """The file-system path of a `file://` URL or an absolute path; None for a remote URL."""
    if location.startswith("file:"):
        return Path(unquote(urlparse(location).path))
    return Path(location) if location.startswith("/") else None


@dataclass
class Mirror:
    """Local folders published under http://127.0.0.1:PORT/<n>/ (`roots[n]`), and the settings rewritten to them."""
    roots: list[Path] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)

    def publish(self, folder: Path, rest: str) -> str:
        if folder not in self.roots:
            self.roots.append(folder)
        return f"http://127.0.0.1:{{port}}/{self.roots.index(folder)}/{rest}"

    def rewrite(self, name: str, location: str) -> str | None:
        """`location` as the build reaches it: remote as is, local through the mirror, missing dropped."""
        path = local_path(location)
        if path is None:
            return location
        if not path.exists():
            self.dropped.append(location)
            return None
        if name == "find-links" and path.is_dir():
            return self.publish(path, "")
        # an index root or a single file: publish its folder, so the index's relative links (../../files/x.whl)
        # stay inside what is served
        return self.publish(path.parent, path.name + ("/" if path.is_dir() else ""))


def build_args(settings: dict[str, str], mirror: Mirror, torch_pin: str | None) -> dict[str, str]:
    """{build argument: value}, URLs still holding `{port}`."""
    args: dict[str, str] = {}
    for name, value in settings.items():
        if name == "cert":  # a path inside the image: the base carries the host's bundle at the same path
            args[SETTINGS[name]] = value
            continue
        kept = [r for r in (mirror.rewrite(name, v) for v in value.split()) if r]
        if kept:
            args[SETTINGS[name]] = " ".join(kept)
    if torch_pin and local_torch(settings.get("find-links", ""), torch_pin):
        args["CPU_TORCH"] = f"{torch_pin}+cpu"  # the local CPU build, never a CUDA one from an index
        args["CPU_TORCH_INDEX"] = ""  # the host's indexes and find-links, not the public PyTorch index
    return args


def local_torch(find_links: str, torch_pin: str) -> bool:
    """Whether a local find-links folder holds the CPU build of `torch==X.Y.Z`."""
    version = torch_pin.partition("==")[2]
    for location in find_links.split():
        path = local_path(location)
        if path and path.is_dir() and any(path.glob(f"torch-{version}+cpu-*.whl")):
            return True
    return False


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves GETs under /<n>/ from roots[n]; nothing else."""

    def __init__(self, *args, roots: list[Path], **kwargs):
        self.roots = roots
        super().__init__(*args, **kwargs)

    def translate_path(self, path: str) -> str:
        head, _, rest = unquote(urlparse(path).path).lstrip("/").partition("/")
        if not head.isdigit() or int(head) >= len(self.roots) or ".." in Path(rest).parts:
            return "/nonexistent"
        return str(self.roots[int(head)] / rest)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's signature
        pass


def serve(roots: list[Path], port: int) -> http.server.ThreadingHTTPServer:
    """Serve `roots` on 127.0.0.1:`port`, or on any free port where that one is taken."""
    handler = functools.partial(Handler, roots=roots)
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("args_file", type=Path)
    parser.add_argument("--torch", default=None, help="the image's torch pin, torch==X.Y.Z")
    parser.add_argument("--port", type=int, default=38517, help="the port to serve on where it is free")
    opts = parser.parse_args()
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
    mirror = Mirror()
    args = build_args(host_settings(listed, dict(os.environ)), mirror, opts.torch)
    server = serve(mirror.roots, opts.port) if mirror.roots else None
    port = server.server_address[1] if server else 0
    for location in mirror.dropped:
        print(f"pip_mirror: {location} does not exist here, left out of the build", file=sys.stderr)
    tmp = opts.args_file.with_suffix(".tmp")
    tmp.write_text("".join(f"{k}={v.replace('{port}', str(port))}\n" for k, v in args.items()))
    tmp.replace(opts.args_file)  # whole or absent: the build script waits for this file
    if server:
        threading.Event().wait()  # serve until the build script ends this process


if __name__ == "__main__":
    main()
