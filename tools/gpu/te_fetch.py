"""Fetch Transformer Engine 2.20.2 for the lent GPU machine and split it so each device call carries < 64 MiB.

The GPU image has no TE and no network. TE's core wheel (`transformer-engine-cu13`, ~276 MB) is larger than what
one call may carry, so it travels in parts: this script (run HERE, on the dev machine, with registry access)
downloads the wheels and the `transformer-engine-torch` sdist, splits the core wheel into parts of `--part-bytes`
and lays them out in git-ignored folders in the repository root:

    .te0/ ... .teN-1/   one part each (carry one folder per call, back to back: the machine stays warm ~30 s)
    .teN/               the last part, the small wheels, the sdist, and MANIFEST (file names + sha256)

Then on the GPU machine `bash tools/gpu/te_build.sh` (in the last call, carrying the last folder and `.whl`)
reassembles the wheel, checks its sha256, installs everything into /tmp/site and builds the torch extension
(~90 s on an H200). `tools/gpu/README.md` has the whole sequence of device calls.

    python3 tools/gpu/te_fetch.py            # ~280 MB download, then the parts
"""

from __future__ import annotations

import argparse
import hashlib
import html
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VERSION = "2.20.2"
CORE = f"transformer-engine-cu13=={VERSION}"
# The core wheel's python part and what the torch extension needs that the GPU image lacks (pydantic and its needs
# travel in .whl with megatron-core, see run_checks.sh).
SMALL = [f"transformer-engine=={VERSION}", "nvdlfw-inspect==0.2.2", "nvidia-cudnn-frontend==1.32.0"]
SDIST = f"transformer_engine_torch-{VERSION}.tar.gz"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "any"]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def pip_download(dest: Path, *requirements: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", "-d", str(dest)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    subprocess.run(cmd + list(requirements), check=True)


def index_url() -> str:
    """The package index pip is configured with (its default when none is)."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.index-url"], capture_output=True,
                         text=True)
    if out.returncode == 0 and out.stdout.strip():
        return out.stdout.strip().rstrip("/")
    from pip._internal.models.index import PyPI

    return PyPI.simple_url.rstrip("/")


def fetch_sdist(dest: Path) -> Path:
    """Download the torch extension's sdist from the index page: pip cannot (its metadata step needs CUDA)."""
    page_url = f"{index_url()}/transformer-engine-torch/"
    page = urllib.request.urlopen(urllib.request.Request(page_url, headers={"Accept": "text/html"}), timeout=120)
    links = [html.unescape(h) for h in re.findall(r'href="([^"]+)"', page.read().decode())]
    match = next((link for link in links if link.split("#")[0].endswith(SDIST)), None)
    if match is None:
        raise SystemExit(f"{SDIST} is not listed on {page_url}")
    url, _, fragment = match.partition("#")
    url = urllib.parse.urljoin(page_url, url)
    out = dest / SDIST
    with urllib.request.urlopen(url, timeout=600) as response, open(out, "wb") as f:
        shutil.copyfileobj(response, f)
    if fragment.startswith("sha256=") and sha256(out) != fragment.removeprefix("sha256="):
        raise SystemExit(f"{SDIST}: sha256 does not match the index")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part-bytes", type=int, default=50_000_000,
                        help="bytes per part of the core wheel (default 50,000,000: a call stays under 64 MiB)")
    parser.add_argument("--root", type=Path, default=ROOT, help="where the .teK folders go (the repo root)")
    args = parser.parse_args(argv)
    for old in args.root.glob(".te[0-9]*"):  # an earlier run's parts; anything else there is not ours to delete
        ours = all(f.is_file() and (f.name.startswith("part") or f.name == "MANIFEST" or f.suffix in (".whl", ".gz"))
                   for f in old.iterdir())
        if not ours:
            raise SystemExit(f"{old} holds files this script did not write; move them away first")
        shutil.rmtree(old)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pip_download(tmp, CORE)
        (core,) = tmp.glob("transformer_engine_cu13-*.whl")
        small = tmp / "small"
        small.mkdir()
        pip_download(small, *SMALL)
        fetch_sdist(small)
        data = core.read_bytes()
        parts = [data[i:i + args.part_bytes] for i in range(0, len(data), args.part_bytes)]
        for k, part in enumerate(parts):
            folder = args.root / f".te{k}"
            folder.mkdir()
            (folder / f"part{k:02d}").write_bytes(part)
        last = args.root / f".te{len(parts) - 1}"
        for f in small.iterdir():
            shutil.copy2(f, last / f.name)
        (last / "MANIFEST").write_text(f"{core.name} {sha256(core)} {len(parts)}\n")
    sizes = ", ".join(f".te{k}: {sum(f.stat().st_size for f in (args.root / f'.te{k}').iterdir()) / 2**20:.1f} MiB"
                      for k in range(len(parts)))
    print(f"{core.name} in {len(parts)} parts ({sizes}); carry .te0 ... .te{len(parts) - 2} one per call, then "
          f".te{len(parts) - 1} + .whl with `bash tools/gpu/te_build.sh`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
