"""`mcpp image build`: the node image, built on this machine with nothing pulled.

1. Base: a Debian bookworm minbase root filesystem with python3 from Debian's packages
   (mmdebstrap), `docker import`ed as `mcpp-base:bookworm`; built once, then reused.
2. Wheels: every dependency (`pip wheel`, rebuilt only when pyproject.toml changes) and mcpp
   itself (rebuilt every time: about 2 s).
3. `docker build` of node/Dockerfile with BASE_IMAGE=mcpp-base:bookworm on a context that
   holds only the wheels: the dependency layer stays cached, so a code change rebuilds in seconds.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mcpp.errors import HarnessError

__all__ = ["build_image", "ImageBuild", "IMAGE_TAG", "BASE_TAG", "repo_root", "image_exists"]

IMAGE_TAG = "mcpp-node:local"
BASE_TAG = "mcpp-base:bookworm"
BASE_PACKAGES = "python3,python3-venv,libgmp10"
TRIM = ["/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*",
        "/usr/share/lintian/*", "/usr/share/zoneinfo/right/*", "/usr/lib/x86_64-linux-gnu/gconv/*"]


def repo_root() -> Path:
    here = Path(__file__).resolve()
    for p in here.parents:
        if (p / "pyproject.toml").exists() and (p / "node" / "Dockerfile").exists():
            return p
    raise HarnessError("image build needs the mcpp source tree (pyproject.toml and node/Dockerfile)")


@dataclass(frozen=True)
class ImageBuild:
    tag: str
    base_built: bool
    base_s: float
    wheels_s: float
    docker_s: float
    total_s: float
    size_mb: float


def _run(cmd: list[str], what: str, cwd: Path | None = None) -> str:
    import os

    # the legacy builder: BuildKit (and buildx) would try to reach a registry
    res = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "DOCKER_BUILDKIT": "0"})
    if res.returncode != 0:
        tail = "\n".join((res.stdout + res.stderr).splitlines()[-25:])
        raise HarnessError(f"{what} failed (exit {res.returncode}): {' '.join(cmd[:4])} ...\n{tail}")
    return res.stdout


def image_exists(tag: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", tag], capture_output=True).returncode == 0


def image_size_mb(tag: str) -> float:
    out = _run(["docker", "image", "inspect", "--format", "{{.Size}}", tag], "docker image inspect")
    return round(int(out.strip()) / 1e6, 1)


def ensure_base(force: bool = False, say: object = print) -> bool:
    """Build and import the Debian base unless it exists. Returns True if it was built."""
    if image_exists(BASE_TAG) and not force:
        return False
    if shutil.which("mmdebstrap") is None:
        raise HarnessError("mmdebstrap is not installed: `apt-get install -y mmdebstrap` (setup.sh does it)")
    with tempfile.TemporaryDirectory(prefix="mcpp-base-") as tmp:
        tar = Path(tmp) / "rootfs.tar"
        cmd = ["mmdebstrap", "--variant=minbase", f"--include={BASE_PACKAGES}", "--quiet"]
        hooks = Path("/usr/share/mmdebstrap/hooks/merged-usr")
        if hooks.is_dir():  # merged /usr without the usrmerge package, which pulls in perl (~30 MB)
            cmd.append(f"--hook-dir={hooks}")
        cmd += [f"--dpkgopt=path-exclude={p}" for p in TRIM]
        cmd += ["bookworm", str(tar)]
        say(f"image: building the Debian bookworm base with mmdebstrap ({BASE_PACKAGES})")  # type: ignore[operator]
        _run(cmd, "mmdebstrap")
        _run(["docker", "import", "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
              str(tar), BASE_TAG], "docker import")
    return True


def _deps_stamp(root: Path) -> str:
    return hashlib.sha256((root / "pyproject.toml").read_bytes() + sys.version.encode()).hexdigest()[:16]


SOURCE_LABEL = "mcpp.source"
_PACKAGED = {".py", ".yaml", ".yml", ".json", ".typed"}


def source_digest(root: Path) -> str:
    """A digest of what goes into the image: the package (code and its data files, e.g. the
    workflow templates), pyproject.toml and the Dockerfile."""
    h = hashlib.sha256()
    pkg = [f for f in (root / "node" / "mcpp").rglob("*") if f.is_file() and f.suffix in _PACKAGED]
    for f in sorted([*pkg, root / "pyproject.toml", root / "node" / "Dockerfile"]):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def stale_image_hint(tag: str) -> str | None:
    """Why `tag` does not hold this source tree's code, or None (it does, or there is no tree)."""
    try:
        root = repo_root()
    except HarnessError:
        return None  # an installed mcpp: nothing to compare with
    res = subprocess.run(["docker", "image", "inspect", "--format", "{{ index .Config.Labels \"%s\" }}" % SOURCE_LABEL, tag],
                         capture_output=True, text=True)
    if res.returncode != 0:
        return f"image {tag} not found: build it with `mcpp image build`"
    if res.stdout.strip() != source_digest(root):
        return f"image {tag} was built from other sources than {root / 'node'}: rebuild it with `mcpp image build`"
    return None


def build_wheels(root: Path, cache: Path, say: object = print) -> Path:
    """Fill cache/context/{deps,app} and copy the Dockerfile there; returns the context dir."""
    ctx = cache / "context"
    deps, app = ctx / "deps", ctx / "app"
    stamp = cache / "deps.stamp"
    py = sys.executable
    if not (stamp.exists() and stamp.read_text() == _deps_stamp(root) and any(deps.glob("*.whl"))):
        say("image: building the dependency wheels (pip wheel; once per pyproject.toml)")  # type: ignore[operator]
        shutil.rmtree(deps, ignore_errors=True)
        deps.mkdir(parents=True)
        _run([py, "-m", "pip", "wheel", "-q", "--wheel-dir", str(deps), str(root)], "pip wheel (dependencies)")
        for w in deps.glob("mcpp-*.whl"):
            w.unlink()
        stamp.write_text(_deps_stamp(root))
    shutil.rmtree(app, ignore_errors=True)
    app.mkdir(parents=True)
    _run([py, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir", str(app), str(root)], "pip wheel (mcpp)")
    shutil.copy(root / "node" / "Dockerfile", ctx / "Dockerfile")
    return ctx


def build_image(tag: str = IMAGE_TAG, rebuild_base: bool = False, say: object = print,
                cold: bool = False) -> ImageBuild:
    """Build the node image here. cold=True rebuilds everything (base, wheels, every layer).
    Raises HarnessError with the failing step's output."""
    if shutil.which("docker") is None:
        raise HarnessError("docker is not installed")
    root = repo_root()
    cache = root / ".cache" / "image"
    if cold:
        shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    built = ensure_base(rebuild_base or cold, say)
    t1 = time.monotonic()
    ctx = build_wheels(root, cache, say)
    t2 = time.monotonic()
    say(f"image: docker build -t {tag} (BASE_IMAGE={BASE_TAG})")  # type: ignore[operator]
    _run(["docker", "build", *(["--no-cache"] if cold else []), "--build-arg", f"BASE_IMAGE={BASE_TAG}", "-t", tag,
          "--label", f"{SOURCE_LABEL}={source_digest(root)}", str(ctx)], "docker build")
    t3 = time.monotonic()
    return ImageBuild(tag, built, round(t1 - t0, 2), round(t2 - t1, 2), round(t3 - t2, 2), round(t3 - t0, 2),
                      image_size_mb(tag))
