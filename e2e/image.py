"""modelfleet's container image, built without Docker, as a Docker archive for `ctr images import`.

    python -m e2e.image build [--json] [--out FILE]   build (or find in the cache) and print the tag;
                                                      --out also writes the Docker archive to FILE
    python -m e2e.image check [--json]                build, unpack and run smoke checks with runc

    ensure_image() -> BuiltImage(tag, archive: oci.DockerArchive); .size_bytes

The image holds what the root Dockerfile's does (Python 3.11 on Debian bookworm, user 10001,
MODELFLEET_CACHE_DIR, HF_HOME, `pip install .`), built from three layers, base first, each an
uncompressed tar cached under <cache>/images/layers/ by the hash of its inputs:

    base     mmdebstrap bookworm minbase + python3, python3-venv, ca-certificates, procps;
             user and group 10001 and the Dockerfile's directories
    deps     /opt/modelfleet: a venv made by the image's own python3, holding the dependencies
             listed in pyproject.toml (keyed by that list)
    project  modelfleet itself, installed --no-deps into that venv from the working tree
             (keyed by pyproject.toml and the modelfleet/ sources)

deps and project are installed in a chroot over an overlay mount of the layers below (in a
private mount namespace, so nothing stays mounted), so each layer's tar is exactly the overlay's
upper directory: a diff, with overlay whiteouts written as `.wh.` files. A code change rebuilds
only the project layer (under a minute); a cold build takes five to seven minutes on 2 cores,
most of it pip. The image is tagged
`localhost/modelfleet:<version>-<12 hex of the layer keys and the image config>`.

The archive itself is never kept: `oci.DockerArchive` writes it from the layer tars on demand,
straight into `ctr images import -` (or to a file with `build --out`). The deps directory the
project layer is built over is removed once that layer is packed and unpacked again from its tar
when the next one is built. So the cache holds the current image's layers once: base (~0.4 GB:
tar + rootfs), deps (~6.3 GB: tar), a few small project layers. Building needs root, mmdebstrap
(installed with apt-get when missing) and overlayfs.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import resource
import shutil
import stat
import subprocess
import sys
import tarfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from e2e import oci
from e2e.build import cache_root

ROOT = Path(__file__).resolve().parents[1]

IMAGE_REPO = "localhost/modelfleet"
SUITE = "bookworm"
MIRRORS = (
    f"deb http://deb.debian.org/debian {SUITE} main",
    f"deb http://deb.debian.org/debian {SUITE}-updates main",
    f"deb http://deb.debian.org/debian-security {SUITE}-security main",
)
# procps: ps/pgrep/free for people debugging a pod (Ray itself uses psutil, which the deps bring).
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "procps")
# Like the python slim images: no manuals, docs (copyright kept) or translations.
DPKG_OPTIONS = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
)
# Bump to rebuild every layer when the recipe below changes in a way the inputs do not show.
RECIPE_VERSION = "2"

UID = GID = 10001
USER_NAME = "modelfleet"
HOME = "/home/modelfleet"
VENV = "/opt/modelfleet"
IMAGE_CACHE_DIR = "/var/cache/modelfleet"
WRITABLE_DIRS = (HOME, IMAGE_CACHE_DIR, "/run/modelfleet")
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
IMAGE_ENV = (
    f"PATH={VENV}/bin:{SYSTEM_PATH}",
    f"VIRTUAL_ENV={VENV}",
    "LANG=C.UTF-8",
    "PYTHONDONTWRITEBYTECODE=1",
    "PYTHONUNBUFFERED=1",
    "PIP_NO_CACHE_DIR=1",
    f"MODELFLEET_CACHE_DIR={IMAGE_CACHE_DIR}",
    f"HF_HOME={IMAGE_CACHE_DIR}/huggingface",
    "RAY_USAGE_STATS_ENABLED=0",
)
# The project files `pip install .` reads (what the Dockerfile copies).
PROJECT_FILES = ("pyproject.toml", "README.md")
PROJECT_PACKAGE = "modelfleet"
LAYER_NAMES = ("base", "deps", "project")


class ImageError(RuntimeError):
    """The image could not be built or checked; the message says which step and why."""


@dataclass(frozen=True)
class BuiltImage:
    """An image whose layers are in the cache."""

    tag: str
    archive: oci.DockerArchive

    @property
    def size_bytes(self) -> int:
        """What its layer tars add up to."""
        return self.archive.layer_bytes


@dataclass(frozen=True)
class LayerKeys:
    """The hash of each layer's inputs; a layer's key includes the keys below it."""

    base: str
    deps: str
    project: str

    def combined(self) -> str:
        return hashlib.sha256(f"{self.base}\n{self.deps}\n{self.project}".encode()).hexdigest()


def image_config(version: str) -> oci.ImageConfig:
    """The Dockerfile's ENV, USER, WORKDIR and CMD (ENTRYPOINT empty), plus the venv on PATH."""
    return oci.ImageConfig(
        entrypoint=[],
        cmd=["modelfleet", "--help"],
        env=list(IMAGE_ENV),
        user=str(UID),
        working_dir=HOME,
        labels={"org.opencontainers.image.title": "modelfleet", "org.opencontainers.image.version": version},
    )


def log(message: str) -> None:
    print(f"[e2e.image {time.strftime('%H:%M:%S')}] {message}", flush=True)


def images_root() -> Path:
    return cache_root() / "images"


# -- inputs and keys ------------------------------------------------------------------------------


def _digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()


def read_project(root: Path = ROOT) -> dict:
    """pyproject.toml's [project] table."""
    with (root / "pyproject.toml").open("rb") as handle:
        return tomllib.load(handle)["project"]


def project_version(root: Path = ROOT) -> str:
    return str(read_project(root)["version"])


def dependencies(root: Path = ROOT) -> list[str]:
    """The runtime requirements pyproject.toml lists (extras are not in the image)."""
    return [str(d) for d in read_project(root).get("dependencies", [])]


def package_files(root: Path = ROOT) -> list[Path]:
    """The sources of the modelfleet package, sorted, without bytecode caches."""
    files = []
    for path in sorted((root / PROJECT_PACKAGE).rglob("*")):
        rel = path.relative_to(root)
        if "__pycache__" in rel.parts or path.suffix in (".pyc", ".pyo") or not path.is_file():
            continue
        files.append(path)
    return files


def base_key() -> str:
    return _digest("base", RECIPE_VERSION, SUITE, *MIRRORS, *BASE_PACKAGES, *DPKG_OPTIONS,
                   str(UID), *WRITABLE_DIRS)


def deps_key(root: Path = ROOT, base: str | None = None) -> str:
    project = read_project(root)
    return _digest("deps", RECIPE_VERSION, base or base_key(), VENV,
                   str(project.get("requires-python", "")), *dependencies(root))


def project_key(root: Path = ROOT, deps: str | None = None) -> str:
    parts: list[str | bytes] = ["project", RECIPE_VERSION, deps or deps_key(root)]
    for name in PROJECT_FILES:
        parts += [name, (root / name).read_bytes()]
    for path in package_files(root):
        parts += [path.relative_to(root).as_posix(), path.read_bytes()]
    return _digest(*parts)


def layer_keys(root: Path = ROOT) -> LayerKeys:
    """The three layers' keys for the tree at `root` (hashes only: nothing is built)."""
    base = base_key()
    deps = deps_key(root, base)
    return LayerKeys(base, deps, project_key(root, deps))


def image_tag(root: Path = ROOT, keys: LayerKeys | None = None) -> str:
    """`localhost/modelfleet:<version>-<12 hex>`, the hex hashing the layer keys and the config."""
    keys = keys or layer_keys(root)
    version = project_version(root)
    config = json.dumps(image_config(version).as_json([]), sort_keys=True)
    return f"{IMAGE_REPO}:{version}-{_digest(keys.combined(), config)[:12]}"


# -- running things -------------------------------------------------------------------------------


def run_logged(cmd: list[str], *, label: str, show: Callable[[str], bool] = lambda _: True,
               env: dict[str, str] | None = None, cwd: Path | None = None) -> None:
    """Run `cmd`, echoing the lines `show` picks and a heartbeat every 30 s; raise with the tail."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, errors="replace")
    tail: list[str] = []
    state = {"lines": 0}

    def heartbeat() -> None:
        while proc.poll() is None:
            time.sleep(30)
            if proc.poll() is None:
                last = tail[-1][:100] if tail else ""
                log(f"{label}: {time.monotonic() - start:4.0f}s, {state['lines']} lines, at: {last}")

    threading.Thread(target=heartbeat, daemon=True).start()
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.rstrip()
        state["lines"] += 1
        tail = [*tail, line][-60:]
        if show(line):
            print(f"  {line}", flush=True)
    if proc.wait() != 0:
        raise ImageError(f"{label} failed (exit {proc.returncode}):\n" + "\n".join(tail))


def ensure_host_tool(tool: str, package: str) -> str:
    """The path of `tool`, installing its Debian package with apt-get when it is missing."""
    found = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    if found:
        return found
    if shutil.which("apt-get") is None:
        raise ImageError(f"`{tool}` is missing and there is no apt-get to install `{package}`")
    if os.geteuid() != 0:
        raise ImageError(f"`{tool}` is missing; install it with `apt-get install {package}` (needs root)")
    log(f"installing {package} with apt-get (for {tool})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run_logged(["apt-get", "update"], label="apt-get update", show=lambda _: False, env=env)
    run_logged(["apt-get", "install", "-y", "--no-install-recommends", package],
               label=f"apt-get install {package}", show=lambda line: line.startswith("Setting up"), env=env)
    found = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")
    if not found:
        raise ImageError(f"apt-get installed {package} but `{tool}` is still not on PATH")
    return found


def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise ImageError(f"{what} needs root (mmdebstrap, overlay mounts, chroot)")


# Mounts an overlay of the lower directories at the merged directory in a private mount
# namespace (the mounts vanish with the process), then runs the command chrooted there.
# $1 lowerdirs, $2 upper, $3 work, $4 merged, $5 host folder shown at /mnt; then the command.
CHROOT_SCRIPT = r"""
set -eu
lower=$1 upper=$2 work=$3 merged=$4 share=$5
shift 5
options="lowerdir=$lower,upperdir=$upper,workdir=$work,redirect_dir=off,metacopy=off"
mount -t overlay overlay -o "$options" "$merged"
mount --rbind /dev "$merged/dev"
mount -t proc proc "$merged/proc"
mount --bind /etc/resolv.conf "$merged/etc/resolv.conf"
mount --bind "$share" "$merged/mnt"
exec chroot "$merged" "$@"
"""
CHROOT_ENV = (
    f"PATH={VENV}/bin:{SYSTEM_PATH}",
    "HOME=/root",
    "LANG=C.UTF-8",
    "PYTHONDONTWRITEBYTECODE=1",
    "PIP_DISABLE_PIP_VERSION_CHECK=1",
    "PIP_CACHE_DIR=/mnt/pip-cache",
    "PIP_PROGRESS_BAR=off",
    "PIP_DEFAULT_TIMEOUT=180",
)


def run_in_overlay(lowers: list[Path], upper: Path, share: Path, cmd: list[str], *, label: str,
                   show: Callable[[str], bool] = lambda _: True) -> None:
    """Run `cmd` chrooted in an overlay of `lowers` (topmost first) whose changes land in `upper`.

    `share` is bind-mounted at /mnt; pip's cache and the host's CA bundle (the one pip on
    this machine trusts) travel through it and never enter a layer.
    """
    work = upper.parent / "overlay-work"
    merged = upper.parent / "overlay-merged"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    merged.mkdir(parents=True, exist_ok=True)
    upper.mkdir(parents=True, exist_ok=True)
    (share / "pip-cache").mkdir(parents=True, exist_ok=True)
    ca = Path(os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt")
    env = list(CHROOT_ENV)
    if ca.is_file():
        shutil.copyfile(ca, share / "host-ca.crt")
        env.append("PIP_CERT=/mnt/host-ca.crt")
    lower = ":".join(str(p) for p in lowers)
    try:
        run_logged(
            ["unshare", "--mount", "--propagation", "private", "--fork", "sh", "-c", CHROOT_SCRIPT, "sh",
             lower, str(upper), str(work), str(merged), str(share), "/usr/bin/env", "-i", *env, *cmd],
            label=label, show=show,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(OSError):
            merged.rmdir()


def clean_upper(upper: Path) -> None:
    """Drop what the build leaves behind that is no part of the image (temp files, caches)."""
    # /tmp and /mnt exist below, so dropping their copied-up directories loses nothing.
    for rel in ("root/.cache", "root/.config", "tmp", "mnt"):
        target = upper / rel
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
    root = upper / "root"
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()


# -- layer tars -----------------------------------------------------------------------------------


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _is_opaque(path: Path) -> bool:
    for name in ("trusted.overlay.opaque", "user.overlay.opaque"):
        with contextlib.suppress(OSError):
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
    return False


class _HashingWriter:
    """A binary file that hashes what is written to it (tarfile asks only write and tell)."""

    def __init__(self, handle: BinaryIO) -> None:
        self.handle, self.digest, self.size = handle, hashlib.sha256(), 0

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.handle.write(data)

    def tell(self) -> int:
        return self.size


def pack_layer(src: Path, out: Path, *, skip_contents: tuple[str, ...] = ()) -> oci.Layer:
    """Write the tree at `src` as an uncompressed layer tar at `out`; return it with its digest
    (hashed as it is written, so a 6 GB layer is not read back).

    Overlay whiteouts (0/0 character devices) become `.wh.<name>` files and opaque directories
    get a `.wh..wh..opq` entry, as the image layer format wants. Owners are numeric; hard links
    stay links. Directories named in `skip_contents` (relative, e.g. "proc") go in empty.
    """
    partial = out.with_name(out.name + ".partial")
    with partial.open("wb") as handle:
        sink = _HashingWriter(handle)
        with tarfile.open(fileobj=sink, mode="w", format=tarfile.PAX_FORMAT, copybufsize=1 << 20) as tar:
            _pack_dir(tar, src, "", set(skip_contents))
    partial.replace(out)
    return oci.Layer(out, sink.digest.hexdigest(), sink.size)


def _pack_dir(tar: tarfile.TarFile, folder: Path, rel: str, skip_contents: set[str]) -> None:
    """Add the entries of `folder` (arcname prefix `rel`), directories before their contents."""
    if rel and _is_opaque(folder):
        _add_empty(tar, f"{rel}/.wh..wh..opq")
    for name in sorted(os.listdir(folder)):
        path = folder / name
        arcname = f"{rel}/{name}" if rel else name
        st = path.lstat()
        if _is_whiteout(st):
            _add_empty(tar, f"{rel}/.wh.{name}" if rel else f".wh.{name}")
            continue
        info = tar.gettarinfo(str(path), arcname)
        if info is None:  # sockets: no part of an image
            continue
        info.uname = info.gname = ""
        if info.isreg():
            with path.open("rb") as handle:
                tar.addfile(info, handle)
        else:
            tar.addfile(info)
        if stat.S_ISDIR(st.st_mode) and arcname not in skip_contents:
            _pack_dir(tar, path, arcname, skip_contents)


def _add_empty(tar: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.mode = 0o644
    tar.addfile(info)


# -- the layers -----------------------------------------------------------------------------------


# A dependency layer's venv (torch with its CUDA libraries, Ray) when no earlier one says better.
DEPS_BYTES_GUESS = 13 * 10**9


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem holding `path` (its nearest existing parent)."""
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def need_space(folder: Path, needed: int, what: str) -> None:
    """Fail before a step that would fill the disk halfway, naming the folder and the way out."""
    free = free_bytes(folder)
    if free < needed:
        raise ImageError(
            f"{what} needs about {needed / 1e9:.1f} GB free under {folder}, and only "
            f"{free / 1e9:.1f} GB are: free some space there, or point MODELFLEET_CACHE_DIR at a "
            f"larger disk"
        )


def deps_bytes_estimate() -> int:
    """The size of the largest dependency layer built before, else DEPS_BYTES_GUESS."""
    sizes = []
    for meta in (images_root() / "layers").glob("deps-*/meta.json"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            sizes.append(int(json.loads(meta.read_text())["size"]))
    return max(sizes, default=DEPS_BYTES_GUESS)


def layer_dir(kind: str, key: str) -> Path:
    return images_root() / "layers" / f"{kind}-{key[:24]}"


def _layer_ready(folder: Path) -> bool:
    return (folder / "layer.tar").is_file() and (folder / "meta.json").is_file()


def _finish_layer(partial: Path, final: Path, layer: oci.Layer, meta: dict) -> Path:
    meta |= {"size": layer.size, "sha256": layer.sha256}
    (partial / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    return final


def layer_of(folder: Path) -> oci.Layer:
    """A finished layer's tar with its digest (from meta.json; hashed once if a cache predates it)."""
    tar, meta_path = folder / "layer.tar", folder / "meta.json"
    meta = json.loads(meta_path.read_text())
    if meta.get("sha256") is None or meta.get("size") != tar.stat().st_size:
        meta["sha256"], meta["size"] = oci.sha256_file(tar), tar.stat().st_size
        meta_path.write_text(json.dumps(meta, indent=2, sort_keys=True))
    return oci.Layer(tar, meta["sha256"], meta["size"])


def restore_upper(tar_path: Path, upper: Path) -> None:
    """Unpack a layer tar as the overlay upper directory it was packed from (as root).

    The inverse of pack_layer: `.wh.<name>` becomes a 0/0 character device and `.wh..wh..opq`
    the opaque xattr on its directory, so the result can serve as an overlay lower directory.
    """
    _require_root("unpacking a layer with its owners")
    need_space(upper.parent, tar_path.stat().st_size + 10**9, f"unpacking {tar_path}")
    partial = upper.with_name(upper.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    whiteouts: list[str] = []
    directories: list[tarfile.TarInfo] = []
    with tarfile.open(tar_path, mode="r|") as tar:
        for member in tar:
            if member.name.startswith("/") or ".." in member.name.split("/"):
                raise ImageError(f"refusing layer entry {member.name!r} in {tar_path}")
            if member.name.rpartition("/")[2].startswith(".wh."):
                whiteouts.append(member.name)
                continue
            tar.extract(member, partial, numeric_owner=True, filter="fully_trusted")
            if member.isdir():
                directories.append(member)
    # A directory's time changed as its entries went in; put it back, deepest first.
    for member in sorted(directories, key=lambda m: m.name, reverse=True):
        os.utime(partial / member.name, (member.mtime, member.mtime), follow_symlinks=False)
    for name in whiteouts:
        parent, _, leaf = name.rpartition("/")
        folder = partial / parent
        folder.mkdir(parents=True, exist_ok=True)
        if leaf == ".wh..wh..opq":
            os.setxattr(folder, "trusted.overlay.opaque", b"y")
        else:
            os.mknod(folder / leaf.removeprefix(".wh."), stat.S_IFCHR | 0o000, os.makedev(0, 0))
    shutil.rmtree(upper, ignore_errors=True)
    partial.rename(upper)


def build_base(key: str) -> Path:
    """mmdebstrap the base rootfs into <layer>/rootfs (kept: the lower of the next layers)."""
    final = layer_dir("base", key)
    if _layer_ready(final):
        return final
    _require_root("building the base layer")
    mmdebstrap = ensure_host_tool("mmdebstrap", "mmdebstrap")
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    rootfs = partial / "rootfs"
    cmd = [mmdebstrap, "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", "--format=directory",
           *(f"--dpkgopt={o}" for o in DPKG_OPTIONS), SUITE, str(rootfs), *MIRRORS]
    start = time.monotonic()
    log(f"base: mmdebstrap {SUITE} minbase + {', '.join(BASE_PACKAGES)}")
    run_logged(cmd, label="mmdebstrap", show=lambda line: line.startswith(("I: ", "E: ", "W: ")))
    log(f"base: mmdebstrap done in {time.monotonic() - start:.0f}s")
    customize_base(rootfs)
    start = time.monotonic()
    layer = pack_layer(rootfs, partial / "layer.tar", skip_contents=("dev", "proc", "sys", "tmp"))
    log(f"base: packed {layer.size / 1e6:.0f} MB in {time.monotonic() - start:.0f}s")
    python = subprocess.run(["chroot", str(rootfs), "python3", "--version"],
                            capture_output=True, text=True, check=False).stdout.strip()
    return _finish_layer(partial, final, layer, {"key": key, "python": python})


def customize_base(rootfs: Path) -> None:
    """The Dockerfile's user, group and directories, and the files a runtime mounts over."""
    etc = rootfs / "etc"
    lines = {
        "passwd": f"{USER_NAME}:x:{UID}:{GID}::{HOME}:/bin/sh",
        "group": f"{USER_NAME}:x:{GID}:",
        "shadow": f"{USER_NAME}:!::0:99999:7:::",
        "gshadow": f"{USER_NAME}:!::",
    }
    for name, line in lines.items():
        path = etc / name
        text = path.read_text() if path.exists() else ""
        if f"\n{USER_NAME}:" not in f"\n{text}":
            path.write_text(text + ("" if text.endswith("\n") or not text else "\n") + line + "\n")
    for rel in WRITABLE_DIRS:
        folder = rootfs / rel.lstrip("/")
        folder.mkdir(parents=True, exist_ok=True)
        os.chown(folder, UID, GID)
        folder.chmod(0o755)
    skel = etc / "skel"
    if skel.is_dir():
        for item in skel.iterdir():
            if item.is_file():
                target = rootfs / HOME.lstrip("/") / item.name
                shutil.copyfile(item, target)
                os.chown(target, UID, GID)
    # mmdebstrap copies the build machine's network files; the runtime mounts its own over
    # these (the overlay builds below bind the host's resolv.conf), so ship neutral ones.
    network_files = {
        "resolv.conf": "",
        "hostname": "",
        "hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    }
    for name, text in network_files.items():
        path = etc / name
        if path.is_symlink():
            path.unlink()
        path.write_text(text)
        path.chmod(0o644)


def build_deps(key: str, base: Path, root: Path = ROOT) -> Path:
    """A venv at /opt/modelfleet with pyproject's dependencies, as a diff over the base."""
    final = layer_dir("deps", key)
    if _layer_ready(final):
        return final
    _require_root("building the dependency layer")
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    # The venv in the overlay's upper directory, then its tar beside it.
    need_space(final.parent, 2 * deps_bytes_estimate(), "building the dependency layer")
    upper = partial / "upper"
    share = images_root() / "share"
    reqs = dependencies(root)
    start = time.monotonic()
    log(f"deps: python3 -m venv {VENV}; pip install {len(reqs)} requirements")
    run_in_overlay([base / "rootfs"], upper, share, ["python3", "-m", "venv", VENV], label="venv")
    run_in_overlay(
        [base / "rootfs"], upper, share, [f"{VENV}/bin/pip", "install", *reqs], label="pip install",
        show=lambda line: line.startswith(("Collecting", "Successfully", "ERROR"))
        and "(from" not in line,
    )
    log(f"deps: pip install done in {time.monotonic() - start:.0f}s")
    clean_upper(upper)
    start = time.monotonic()
    layer = pack_layer(upper, partial / "layer.tar")
    log(f"deps: packed {layer.size / 1e9:.2f} GB in {time.monotonic() - start:.0f}s")
    return _finish_layer(partial, final, layer, {"key": key, "requirements": reqs,
                                                 "installed": installed_versions(upper)})


def installed_versions(upper: Path) -> dict[str, str]:
    """name -> version of the distributions in the venv's site-packages under `upper`."""
    found: dict[str, str] = {}
    for site in upper.glob(f"{VENV.lstrip('/')}/lib/python3*/site-packages"):
        for dist in site.glob("*.dist-info"):
            name, _, version = dist.name.removesuffix(".dist-info").partition("-")
            found[name.lower()] = version
    return dict(sorted(found.items()))


def build_project(key: str, base: Path, deps: Path, root: Path = ROOT) -> Path:
    """modelfleet from the working tree, installed --no-deps into the venv, as a diff over deps."""
    final = layer_dir("project", key)
    if _layer_ready(final):
        return final
    _require_root("building the project layer")
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    upper = partial / "upper"
    share = images_root() / "share"
    src = share / "src"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    deps_upper = deps / "upper"
    if not deps_upper.is_dir():
        start = time.monotonic()
        log("project: unpacking the deps layer to build over")
        restore_upper(deps / "layer.tar", deps_upper)
        log(f"project: deps unpacked in {time.monotonic() - start:.0f}s")
    for name in PROJECT_FILES:
        shutil.copy2(root / name, src / name)
    for path in package_files(root):
        target = src / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    start = time.monotonic()
    log("project: pip install --no-deps modelfleet")
    run_in_overlay(
        [deps_upper, base / "rootfs"], upper, share,
        [f"{VENV}/bin/pip", "install", "--no-deps", "/mnt/src"],
        label="pip install modelfleet", show=lambda line: line.startswith(("Successfully", "ERROR")),
    )
    log(f"project: installed in {time.monotonic() - start:.0f}s")
    clean_upper(upper)
    start = time.monotonic()
    layer = pack_layer(upper, partial / "layer.tar")
    log(f"project: packed {layer.size / 1e6:.1f} MB in {time.monotonic() - start:.1f}s")
    shutil.rmtree(upper)
    shutil.rmtree(src)
    return _finish_layer(partial, final, layer, {"key": key})


# -- the image ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _build_lock() -> Iterator[None]:
    """One build at a time per cache (a test and a developer's command may race)."""
    images_root().mkdir(parents=True, exist_ok=True)
    with (images_root() / ".lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _assemble(tag: str, folders: list[Path], root: Path) -> BuiltImage:
    layers = tuple(layer_of(f) for f in folders)
    return BuiltImage(tag, oci.DockerArchive(tag, layers, image_config(project_version(root))))


def _drop_copies(deps: Path) -> None:
    """Remove what only repeats a layer tar: the deps directory the project layer was built over
    (unpacked again when the next one is built) and archives an earlier version saved."""
    shutil.rmtree(deps / "upper", ignore_errors=True)
    shutil.rmtree(images_root() / "archives", ignore_errors=True)


def _cached(tag: str, keys: LayerKeys, root: Path) -> BuiltImage | None:
    folders = [layer_dir(kind, getattr(keys, kind)) for kind in LAYER_NAMES]
    if all(_layer_ready(f) for f in folders):
        for folder in folders:
            os.utime(folder / "meta.json")
        _drop_copies(folders[1])
        return _assemble(tag, folders, root)
    return None


def ensure_image(root: Path = ROOT) -> BuiltImage:
    """The image of the tree at `root`: its cached layers at once, else build what changed."""
    keys = layer_keys(root)
    tag = image_tag(root, keys)
    with _build_lock():
        found = _cached(tag, keys, root)
        if found:
            return found
        start = time.monotonic()
        log(f"building {tag}")
        base = build_base(keys.base)
        deps = build_deps(keys.deps, base, root)
        project = build_project(keys.project, base, deps, root)
        _drop_copies(deps)
        built = _assemble(tag, [base, deps, project], root)
        for folder in (base, deps, project):
            os.utime(folder / "meta.json")
        prune(keep={base.name, deps.name, project.name})
        log(f"built {tag} in {time.monotonic() - start:.0f}s: {built.size_bytes / 1e9:.2f} GB of layers")
        return built


def prune(keep: set[str], spare_projects: int = 4) -> None:
    """Remove unfinished work and the layers the current image does not use.

    A dependency layer takes about 6 GB, so only the current one stays; a few recent project
    layers (about 1 MB each) are spared. Archives an earlier version of this module kept go too.
    """
    layers = images_root() / "layers"
    for kind in LAYER_NAMES:
        others = sorted(
            (d for d in layers.glob(f"{kind}-*") if d.name not in keep),
            key=lambda d: d.stat().st_mtime if d.name.endswith(".partial") else
            (d / "meta.json").stat().st_mtime if (d / "meta.json").exists() else 0,
            reverse=True,
        )
        finished = [d for d in others if not d.name.endswith(".partial") and _layer_ready(d)]
        for folder in others:
            if folder not in finished[: spare_projects if kind == "project" else 0]:
                shutil.rmtree(folder, ignore_errors=True)
    for interrupted in layers.glob("*/upper.partial"):  # an unpack that did not finish
        shutil.rmtree(interrupted, ignore_errors=True)


def layer_info(keys: LayerKeys | None = None) -> dict[str, dict]:
    """The cached layers' meta.json (size, python, installed versions); default: the current tree's."""
    keys = keys or layer_keys()
    info = {}
    for kind in LAYER_NAMES:
        meta = layer_dir(kind, getattr(keys, kind)) / "meta.json"
        info[kind] = json.loads(meta.read_text()) if meta.exists() else {}
    return info


# -- running the image ----------------------------------------------------------------------------


def unpack_image(archive: oci.DockerArchive, dest: Path) -> dict:
    """Apply an image's layer tars, base first, onto `dest` (as root: owners are kept).

    Whiteouts remove what lower layers put there. Returns the image's config JSON.
    """
    _require_root("unpacking an image with its owners")
    dest.mkdir(parents=True, exist_ok=True)
    real_dest = os.path.realpath(dest)
    for layer in archive.layers:
        with tarfile.open(layer.path, mode="r|") as tar:
            _apply_layer(tar, dest, real_dest)
    return json.loads(archive.config_json())


def _apply_layer(tar: tarfile.TarFile, dest: Path, real_dest: str) -> None:
    added: set[str] = set()
    for member in tar:
        name = member.name.removeprefix("./").rstrip("/")
        if not name or name.startswith("/") or ".." in name.split("/"):
            raise ImageError(f"refusing layer entry {member.name!r}")
        parent, _, leaf = name.rpartition("/")
        if os.path.commonpath([os.path.realpath(dest / parent), real_dest]) != real_dest:
            raise ImageError(f"layer entry {member.name!r} would land outside {dest}")
        if leaf == ".wh..wh..opq":
            folder = dest / parent
            for child in folder.iterdir() if folder.is_dir() else []:
                if f"{parent}/{child.name}" not in added:
                    _remove(child)
            continue
        if leaf.startswith(".wh."):
            _remove(dest / parent / leaf.removeprefix(".wh."))
            continue
        target = dest / name
        if (target.exists() or target.is_symlink()) and not (target.is_dir() and member.isdir()):
            _remove(target)
        member.name = name
        tar.extract(member, dest, numeric_owner=True, filter="fully_trusted")
        added.add(name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@dataclass(frozen=True)
class RunResult:
    args: list[str]
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def run_in_image(rootfs: Path, args: list[str], *, config: dict, timeout: float = 300,
                 uid: int | None = None) -> RunResult:
    """Run `args` with runc in `rootfs`, as the image's user, env and working directory.

    The container gets its own network namespace holding only loopback: no network.
    """
    runc = ensure_host_tool("runc", "runc")
    image = config.get("config", {})
    user = str(image.get("User") or "0")
    if uid is None:
        uid = int(user.split(":")[0])
    bundle = Path(tempfile_dir()) / f"bundle-{os.getpid()}-{time.monotonic_ns()}"
    bundle.mkdir(parents=True)
    state = bundle / "state"
    name = f"modelfleet-image-check-{bundle.name.removeprefix('bundle-')}"
    try:
        subprocess.run([runc, "spec", "--bundle", str(bundle)], check=True, capture_output=True)
        spec = json.loads((bundle / "config.json").read_text())
        spec["root"] = {"path": str(rootfs.resolve()), "readonly": False}
        spec["hostname"] = "modelfleet-check"
        process = spec["process"]
        process.update(terminal=False, args=args, env=list(image.get("Env", [])),
                       cwd=image.get("WorkingDir") or "/")
        process["user"] = {"uid": uid, "gid": uid if ":" not in user else int(user.split(":")[1])}
        # runc's default of 1024 open files is below what Ray asks for; a kubelet's pods get more.
        # It may not exceed the hard limit runc itself runs under.
        files = min(65536, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
        process["rlimits"] = [{"type": "RLIMIT_NOFILE", "hard": files, "soft": files}]
        (bundle / "config.json").write_text(json.dumps(spec, indent=2))
        start = time.monotonic()
        try:
            proc = subprocess.run([runc, "--root", str(state), "run", "--bundle", str(bundle), name],
                                  capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired as err:
            subprocess.run([runc, "--root", str(state), "kill", name, "KILL"], capture_output=True,
                           check=False)
            raise ImageError(f"{args} ran past {timeout:.0f}s in the image:\n{err.stdout}\n{err.stderr}") \
                from err
        return RunResult(args, proc.returncode, proc.stdout, proc.stderr, time.monotonic() - start)
    finally:
        subprocess.run([runc, "--root", str(state), "delete", "--force", name], capture_output=True,
                       check=False)
        shutil.rmtree(bundle, ignore_errors=True)


def tempfile_dir() -> str:
    return str(images_root() / "run")


# Loads builtin://tiny-llama (created on first use in MODELFLEET_CACHE_DIR, offline) and
# generates greedily twice: the two runs must agree.
GENERATE_SCRIPT = r"""
import json, os, time
from modelfleet.engine import EngineConfig, LLMEngine, SamplingParams
start = time.monotonic()
engine = LLMEngine(EngineConfig(model="builtin://tiny-llama", device="cpu", num_kv_blocks=64,
                                max_model_len=256))
loaded = time.monotonic() - start
params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
outs = engine.generate_batch(["The quick brown fox", "The quick brown fox"], params)
engine.close()
print(json.dumps({
    "model_path": engine.served_model_path, "uid": os.getuid(), "load_seconds": round(loaded, 2),
    "texts": [o.text for o in outs], "token_ids": [o.token_ids for o in outs],
    "finish_reasons": [o.finish_reason for o in outs],
}))
"""
# A one-node Ray cluster as a pod's head starts it (no dashboard, small object store), one task.
RAY_SCRIPT = r"""
ray start --head --num-cpus=1 --include-dashboard=false --disable-usage-stats \
    --object-store-memory=100000000 >/tmp/ray-start.log 2>&1 || { cat /tmp/ray-start.log; exit 1; }
python -c "import ray; ray.init(address='auto', log_to_driver=False); \
print('ray task:', ray.get(ray.remote(lambda: 41 + 1).remote()))"
status=$?
ray stop >/dev/null 2>&1
exit $status
"""
SMOKE_CHECKS: dict[str, list[str]] = {
    "modelfleet --version": ["modelfleet", "--version"],
    "imports": ["python", "-c", "import json, sys, torch, ray, modelfleet, modelfleet.serving; "
                "print(json.dumps({'python': sys.version.split()[0], 'torch': torch.__version__, "
                "'ray': ray.__version__, 'modelfleet': modelfleet.__version__, "
                "'executable': sys.executable}))"],
    "ray --version": ["ray", "--version"],
    "tiny-llama generation": ["python", "-c", GENERATE_SCRIPT],
    "ray start --head": ["sh", "-c", RAY_SCRIPT],
}


def check_image(built: BuiltImage, rootfs: Path | None = None) -> dict[str, RunResult]:
    """Unpack the archive (unless `rootfs` already holds it) and run SMOKE_CHECKS with runc."""
    own = rootfs is None
    rootfs = rootfs or Path(tempfile_dir()) / f"rootfs-{os.getpid()}"
    try:
        start = time.monotonic()
        if own:
            shutil.rmtree(rootfs, ignore_errors=True)
        config = unpack_image(built.archive, rootfs)
        log(f"check: unpacked into {rootfs} in {time.monotonic() - start:.0f}s")
        results = {}
        for label, args in SMOKE_CHECKS.items():
            result = run_in_image(rootfs, args, config=config)
            results[label] = result
            verdict = "ok" if result.returncode == 0 else f"FAILED (exit {result.returncode})"
            log(f"check: {label}: {verdict} in {result.seconds:.1f}s")
            last = (result.stdout.strip().splitlines() or [""])[-1]
            print(f"  {last[:300]}" if result.returncode == 0 else result.stdout + result.stderr, flush=True)
        return results
    finally:
        if own:
            shutil.rmtree(rootfs, ignore_errors=True)


# -- command line ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.image", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["build", "check", "tag"],
                        help="build the archive; build and run the smoke checks; print the tag")
    parser.add_argument("--json", action="store_true",
                        help="progress on stderr, one JSON object (tag, size_bytes, layers, ...) on stdout")
    parser.add_argument("--out", type=Path, metavar="FILE",
                        help="also write the Docker archive to FILE (for `ctr images import FILE`)")
    args = parser.parse_args(argv)
    if args.command == "tag":
        print(image_tag())
        return 0
    start = time.monotonic()
    progress = contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext()
    with progress:
        try:
            built = ensure_image()
            layers = layer_info()
            report = {"tag": built.tag, "size_bytes": built.size_bytes,
                      "layer_tars": [str(layer.path) for layer in built.archive.layers],
                      "seconds": round(time.monotonic() - start, 1),
                      "layers": {k: {"size": v.get("size")} for k, v in layers.items()},
                      "versions": {k: v for k, v in layers["deps"].get("installed", {}).items()
                                   if k in ("torch", "ray", "numpy", "kopf", "pydantic")}}
            if args.out:
                saved = time.monotonic()
                built.archive.save(args.out)
                report["archive"] = str(args.out)
                log(f"archive: {args.out.stat().st_size / 1e9:.2f} GB written in "
                    f"{time.monotonic() - saved:.0f}s to {args.out}")
            if args.command == "check":
                results = check_image(built)
                report["checks"] = {k: r.returncode == 0 for k, r in results.items()}
        except ImageError as err:
            log(f"failed after {time.monotonic() - start:.0f}s:\n{err}")
            return 1
        log(f"{built.tag}: {built.size_bytes / 1e9:.2f} GB of layers ({report['seconds']:.1f}s)")
    if args.json:
        print(json.dumps(report))
    else:
        print(built.tag)
        if args.out:
            print(args.out)
    return 0 if all(report.get("checks", {}).values()) else 1


if __name__ == "__main__":
    sys.exit(main())
