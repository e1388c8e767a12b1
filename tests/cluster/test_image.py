"""The container image built without Docker (e2e/image.py): its archive, its layers, and runs of it.

The image is built (or taken from the cache) through ensure_image(); a cold build downloads the
dependencies from PyPI and takes several minutes. The container checks unpack the archive's
layers into a directory and run commands in it with runc, as user 10001, without network.
Needs root (mmdebstrap, overlay mounts, chown while unpacking, runc).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from e2e import image, oci  # noqa: E402

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(3600)]

VERSION = image.project_version()


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("building and running the image needs root (mmdebstrap, overlay mounts, runc)",
                    pytrace=False)


@pytest.fixture(scope="module")
def built() -> image.BuiltImage:
    _need_root()
    try:
        return image.ensure_image()
    except image.ImageError as err:
        pytest.fail(f"the image did not build:\n{err}", pytrace=False)


class _Counting:
    """A binary reader that hashes and counts what passes through it."""

    def __init__(self, handle) -> None:
        self.handle, self.digest, self.count = handle, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.digest.update(data)
        self.count += len(data)
        return data


@pytest.fixture(scope="module")
def archive(built: image.BuiltImage) -> dict:
    """The archive as `ctr images import -` receives it (written into a pipe and read as a stream):
    its manifest, config, size, and per layer its sha256 and its entries by name."""
    read_end, write_end = os.pipe()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            with open(write_end, "wb") as pipe:
                built.archive.write(pipe)
        except BaseException as err:  # reported below, with what the reader saw
            errors.append(err)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    found: dict = {"layers": []}
    with open(read_end, "rb") as pipe:
        stream = _Counting(pipe)
        with tarfile.open(fileobj=stream, mode="r|") as outer:
            for member in outer:
                handle = outer.extractfile(member)
                if member.name == "manifest.json":
                    found["manifest"] = json.load(handle)
                elif member.name.endswith("/layer.tar"):
                    layer_bytes = _Counting(handle)
                    with tarfile.open(fileobj=layer_bytes, mode="r|") as layer:
                        entries = {m.name: m for m in layer}
                    while layer_bytes.read(1 << 20):  # the rest: end-of-archive blocks
                        pass
                    found["layers"].append({"name": member.name, "sha256": layer_bytes.digest.hexdigest(),
                                            "size": layer_bytes.count, "entries": entries})
                elif member.name.endswith(".json"):
                    found["config_name"], found["config"] = member.name, json.load(handle)
        while stream.read(1 << 20):
            pass
    writer.join(60)
    assert not errors, errors
    found["streamed_bytes"] = stream.count
    return found


@pytest.fixture(scope="module")
def rootfs(built: image.BuiltImage, tmp_path_factory: pytest.TempPathFactory):
    """The archive unpacked into a directory, and the image config; runc installed."""
    try:
        image.ensure_host_tool("runc", "runc")
    except image.ImageError as err:
        pytest.fail(str(err), pytrace=False)
    dest = tmp_path_factory.mktemp("image") / "rootfs"
    config = image.unpack_image(built.archive, dest)
    yield dest, config
    shutil.rmtree(dest, ignore_errors=True)


def run(rootfs, args: list[str], timeout: float = 300) -> image.RunResult:
    folder, config = rootfs
    result = image.run_in_image(folder, args, config=config, timeout=timeout)
    assert result.returncode == 0, (
        f"{args} exited {result.returncode} in the image:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


# -- the archive ----------------------------------------------------------------------------------


def test_tag_names_version_and_layers(built: image.BuiltImage, archive: dict) -> None:
    assert re.fullmatch(rf"localhost/modelfleet:{re.escape(VERSION)}-[0-9a-f]{{12}}", built.tag)
    assert built.tag == image.image_tag()
    assert archive["manifest"][0]["RepoTags"] == [built.tag]
    assert archive["manifest"][0]["Config"] == archive["config_name"]
    assert archive["manifest"][0]["Layers"] == [layer["name"] for layer in archive["layers"]]
    assert built.size_bytes == sum(layer["size"] for layer in archive["layers"])
    assert 0 < archive["streamed_bytes"] - built.size_bytes < 2**20, "headers and JSON only"
    assert image.ensure_image() == built, "a second call must return the cached layers"


def test_no_second_copy_of_the_layers_stays_in_the_cache(built: image.BuiltImage) -> None:
    """The cache holds each layer's tar once: no saved archive, no unpacked deps directory."""
    root = image.images_root()
    assert not (root / "archives").exists()
    deps = built.archive.layers[1].path.parent
    assert not (deps / "upper").exists() and not (deps / "upper.partial").exists()


def test_config_matches_the_dockerfile(archive: dict) -> None:
    config = archive["config"]["config"]
    assert config["User"] == "10001"
    assert config["WorkingDir"] == "/home/modelfleet"
    assert config["Cmd"] == ["modelfleet", "--help"]
    assert "Entrypoint" not in config
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["PATH"].split(":")[0] == "/opt/modelfleet/bin"
    assert env["MODELFLEET_CACHE_DIR"] == "/var/cache/modelfleet"
    assert env["HF_HOME"] == "/var/cache/modelfleet/huggingface"
    assert env["RAY_USAGE_STATS_ENABLED"] == "0"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert archive["config"]["os"] == "linux" and archive["config"]["architecture"] == "amd64"


def test_diff_ids_are_the_layer_digests(archive: dict) -> None:
    diff_ids = archive["config"]["rootfs"]["diff_ids"]
    assert [f"sha256:{layer['sha256']}" for layer in archive["layers"]] == diff_ids
    assert len(diff_ids) == 3, "base, dependencies, project"
    for layer in archive["layers"]:
        assert layer["name"] == f"{layer['sha256']}/layer.tar"


def test_base_layer_has_the_user_and_directories(archive: dict) -> None:
    entries = archive["layers"][0]["entries"]
    for folder in ("var/cache/modelfleet", "run/modelfleet", "home/modelfleet"):
        assert entries[folder].isdir(), folder
        assert (entries[folder].uid, entries[folder].gid) == (10001, 10001), folder
    assert entries["usr/bin/python3.11"].isreg()
    assert entries["usr/bin/ps"].isreg(), "procps"
    assert not [n for n in entries if n.startswith(("dev/", "proc/", "sys/", "opt/modelfleet"))]


def test_dependency_layer_holds_only_the_venv(archive: dict) -> None:
    entries = archive["layers"][1]["entries"]
    outside = [n for n in entries if n != "opt" and not n.startswith("opt/modelfleet")]
    assert not outside, f"the dependency layer changes more than the venv: {outside[:20]}"
    site = "opt/modelfleet/lib/python3.11/site-packages"
    for package in ("torch", "ray", "kopf", "pydantic", "safetensors", "tokenizers"):
        assert f"{site}/{package}/__init__.py" in entries, package
    assert not [n for n in entries if n.startswith(f"{site}/modelfleet")], "modelfleet is in the top layer"
    cfg = entries["opt/modelfleet/pyvenv.cfg"]
    assert cfg.isreg()


def test_project_layer_holds_only_modelfleet(archive: dict) -> None:
    entries = archive["layers"][2]["entries"]
    site = "opt/modelfleet/lib/python3.11/site-packages"
    files = [n for n, m in entries.items() if not m.isdir()]
    assert f"{site}/modelfleet/__init__.py" in files
    assert f"{site}/modelfleet/serving/__init__.py" in files
    assert "opt/modelfleet/bin/modelfleet" in files
    stray = [n for n in files if not n.startswith((f"{site}/modelfleet/", f"{site}/modelfleet-"))
             and n != "opt/modelfleet/bin/modelfleet"]
    assert not stray, f"the project layer holds more than modelfleet: {stray[:20]}"
    assert sum(m.size for m in entries.values()) < 20_000_000


# -- cache keys (hashing only: nothing is built) -------------------------------------------------


def _copy_tree(dest: Path) -> Path:
    for name in image.PROJECT_FILES:
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "modelfleet", dest / "modelfleet",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def test_a_code_change_changes_only_the_top_layer(tmp_path: Path) -> None:
    tree = _copy_tree(tmp_path)
    before = image.layer_keys(tree)
    (tree / "modelfleet" / "serving" / "__init__.py").write_text(
        (tree / "modelfleet" / "serving" / "__init__.py").read_text() + "\n# changed\n"
    )
    after = image.layer_keys(tree)
    assert (after.base, after.deps) == (before.base, before.deps)
    assert after.project != before.project
    assert image.image_tag(tree, after) != image.image_tag(tree, before)


def test_new_package_file_and_bytecode(tmp_path: Path) -> None:
    tree = _copy_tree(tmp_path)
    before = image.layer_keys(tree)
    cache = tree / "modelfleet" / "__pycache__"
    cache.mkdir()
    (cache / "cli.cpython-311.pyc").write_bytes(b"\0" * 16)
    assert image.layer_keys(tree) == before, "bytecode caches are not sources"
    (tree / "modelfleet" / "engine" / "extra.py").write_text("X = 1\n")
    assert image.layer_keys(tree).project != before.project


def test_a_dependency_change_keeps_the_base(tmp_path: Path) -> None:
    tree = _copy_tree(tmp_path)
    before = image.layer_keys(tree)
    text = (tree / "pyproject.toml").read_text()
    assert '"rich>=13",' in text
    (tree / "pyproject.toml").write_text(text.replace('"rich>=13",', '"rich>=14",'))
    after = image.layer_keys(tree)
    assert after.base == before.base
    assert after.deps != before.deps and after.project != before.project
    # A pyproject edit outside the dependency list leaves the big layer alone.
    (tree / "pyproject.toml").write_text(text.replace('line-length = 110', 'line-length = 100'))
    edited = image.layer_keys(tree)
    assert edited.deps == before.deps and edited.project != before.project


def test_a_config_change_changes_the_tag_only(monkeypatch: pytest.MonkeyPatch) -> None:
    keys, tag = image.layer_keys(), image.image_tag()
    monkeypatch.setattr(image, "IMAGE_ENV", (*image.IMAGE_ENV, "EXTRA=1"))
    assert image.layer_keys() == keys
    assert image.image_tag() != tag


# -- layer diffs: overlay whiteouts in, files removed out -----------------------------------------


def test_whiteouts_round_trip(tmp_path: Path) -> None:
    _need_root()
    lower, upper, dest = tmp_path / "lower", tmp_path / "upper", tmp_path / "dest"
    (lower / "keep").mkdir(parents=True)
    (lower / "keep" / "a").write_text("a")
    (lower / "gone").write_text("gone")
    (lower / "opaque").mkdir()
    (lower / "opaque" / "old").write_text("old")
    (upper / "opaque").mkdir(parents=True)
    (upper / "opaque" / "new").write_text("new")
    os.setxattr(upper / "opaque", "trusted.overlay.opaque", b"y")
    os.mknod(upper / "gone", stat.S_IFCHR | 0o000, os.makedev(0, 0))  # how overlay records a delete
    (upper / "added").write_text("added")
    image.pack_layer(lower, tmp_path / "lower.tar")
    image.pack_layer(upper, tmp_path / "upper.tar")
    with tarfile.open(tmp_path / "upper.tar") as tar:
        names = tar.getnames()
    assert ".wh.gone" in names and "opaque/.wh..wh..opq" in names and "gone" not in names
    dest.mkdir()
    for layer in ("lower.tar", "upper.tar"):
        with tarfile.open(tmp_path / layer) as tar:
            image._apply_layer(tar, dest, os.path.realpath(dest))
    found = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*"))
    assert found == ["added", "keep", "keep/a", "opaque", "opaque/new"]


def test_a_packed_upper_directory_unpacks_to_the_same_layer(tmp_path: Path) -> None:
    """restore_upper is pack_layer's inverse (whiteouts and opaque directories come back as
    overlay writes them), so the project layer builds over an unpacked deps tar as over the
    directory that tar was packed from."""
    _need_root()
    upper = tmp_path / "upper"
    (upper / "opaque").mkdir(parents=True)
    (upper / "opaque" / "new").write_text("new")
    os.setxattr(upper / "opaque", "trusted.overlay.opaque", b"y")
    os.mknod(upper / "gone", stat.S_IFCHR | 0o000, os.makedev(0, 0))
    (upper / "bin").mkdir()
    (upper / "bin" / "tool").write_text("#!/bin/sh\n")
    (upper / "bin" / "tool").chmod(0o755)
    os.chown(upper / "bin" / "tool", 10001, 10001)
    (upper / "bin" / "link").symlink_to("tool")
    os.utime(upper / "bin", (1_600_000_000, 1_600_000_000))  # as a lower's directory copied up
    packed = image.pack_layer(upper, tmp_path / "first.tar")
    assert packed == oci.Layer.of(tmp_path / "first.tar"), "the digest taken while writing is the file's"
    restored = tmp_path / "restored"
    image.restore_upper(tmp_path / "first.tar", restored)
    gone = (restored / "gone").lstat()
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0
    assert os.getxattr(restored / "opaque", "trusted.overlay.opaque") == b"y"
    tool = (restored / "bin" / "tool").stat()
    assert (tool.st_uid, stat.S_IMODE(tool.st_mode)) == (10001, 0o755)
    assert os.readlink(restored / "bin" / "link") == "tool"
    image.pack_layer(restored, tmp_path / "second.tar")
    with tarfile.open(tmp_path / "first.tar") as first, tarfile.open(tmp_path / "second.tar") as second:
        assert [(m.name, m.type, m.mode, m.uid, m.size, m.linkname, int(m.mtime)) for m in first] == \
            [(m.name, m.type, m.mode, m.uid, m.size, m.linkname, int(m.mtime)) for m in second]


def test_unpacking_onto_a_full_disk_stops_first_and_says_where(tmp_path: Path) -> None:
    """A layer unpacked onto a filesystem without room for it fails before writing, naming the
    folder, the sizes and the way out, instead of an OSError halfway through the tar."""
    _need_root()
    source = tmp_path / "source"
    source.mkdir()
    (source / "blob").write_bytes(os.urandom(4 << 20))
    image.pack_layer(source, tmp_path / "layer.tar")
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True)
    try:
        with pytest.raises(image.ImageError) as err:
            image.restore_upper(tmp_path / "layer.tar", small / "upper")
        message = str(err.value)
        assert str(small) in message and "MODELFLEET_CACHE_DIR" in message and "GB free" in message
        assert list(small.iterdir()) == [], "nothing is written before the check"
    finally:
        subprocess.run(["umount", str(small)], check=True)


# -- the image runs -------------------------------------------------------------------------------


def test_modelfleet_version(rootfs) -> None:
    out = run(rootfs, image.SMOKE_CHECKS["modelfleet --version"]).stdout.strip()
    assert out == f"modelfleet {VERSION}"


def test_imports_from_the_venv(rootfs) -> None:
    found = json.loads(run(rootfs, image.SMOKE_CHECKS["imports"]).stdout.strip().splitlines()[-1])
    assert found["executable"] == "/opt/modelfleet/bin/python"
    assert found["python"].startswith("3.11.")
    assert found["modelfleet"] == VERSION
    assert found["ray"].startswith("2.")


def test_ray_version(rootfs) -> None:
    assert "ray, version" in run(rootfs, image.SMOKE_CHECKS["ray --version"]).stdout


def test_user_and_writable_directories(rootfs) -> None:
    script = ("id; for d in /var/cache/modelfleet /run/modelfleet /home/modelfleet /tmp; do "
              "touch $d/.probe && rm $d/.probe || exit 1; done; echo writable")
    out = run(rootfs, ["sh", "-c", script]).stdout
    assert "uid=10001(modelfleet) gid=10001(modelfleet)" in out
    assert out.strip().endswith("writable")


def test_tiny_llama_generates_offline_as_user_10001(rootfs) -> None:
    interfaces = run(rootfs, ["cat", "/proc/net/dev"]).stdout.splitlines()[2:]
    assert [line.split(":")[0].strip() for line in interfaces] == ["lo"], "the check must run offline"
    result = run(rootfs, image.SMOKE_CHECKS["tiny-llama generation"])
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["uid"] == 10001
    assert found["model_path"].startswith("/var/cache/modelfleet/models/tiny-llama")
    first, second = found["token_ids"]
    assert len(first) == 12 and first == second, "greedy decoding must repeat itself"
    assert found["texts"][0] == found["texts"][1] and found["texts"][0].strip()
    assert found["finish_reasons"] == ["length", "length"]
    folder, _ = rootfs
    model = folder / found["model_path"].lstrip("/")
    assert (model / "model.safetensors").stat().st_uid == 10001


def test_ray_head_starts_and_runs_a_task(rootfs) -> None:
    out = run(rootfs, image.SMOKE_CHECKS["ray start --head"], timeout=240).stdout
    assert "ray task: 42" in out
