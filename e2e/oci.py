"""Docker image archives without Docker: layer tars + a config, packed as `docker save` would.

containerd's `ctr images import` reads this format (a tar holding `manifest.json`, the config
JSON whose `rootfs.diff_ids` are the sha256 of the uncompressed layer tars, and the layers).

    write_docker_archive(out, "localhost/modelfleet/pause:3.10", [layer_tar], ImageConfig(...))
    DockerArchive(tag, (Layer.of(tar), ...), config).write(stream)   # no archive file at all

A large image is better streamed than saved: its archive is a second copy of every layer, and
`ctr images import -` reads the stream as it would the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class ImageConfig:
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)
    user: str = ""
    working_dir: str = ""
    labels: dict[str, str] = field(default_factory=dict)

    def as_json(self, diff_ids: list[str]) -> dict:
        config: dict = {"Env": self.env or [DEFAULT_PATH]}
        if self.entrypoint:
            config["Entrypoint"] = self.entrypoint
        if self.cmd:
            config["Cmd"] = self.cmd
        if self.user:
            config["User"] = self.user
        if self.working_dir:
            config["WorkingDir"] = self.working_dir
        if self.labels:
            config["Labels"] = self.labels
        return {
            "architecture": "amd64",
            "os": "linux",
            "config": config,
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created_by": "modelfleet e2e image build"} for _ in diff_ids],
        }


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    archive.addfile(info, io.BytesIO(data))


@dataclass(frozen=True)
class Layer:
    """An uncompressed layer tar, its sha256 (hex) and its size in bytes."""

    path: Path
    sha256: str
    size: int

    @classmethod
    def of(cls, path: Path) -> Layer:
        return cls(path, sha256_file(path), path.stat().st_size)


@dataclass(frozen=True)
class DockerArchive:
    """A Docker archive described by its parts, written on demand to a file or a stream."""

    tag: str
    layers: tuple[Layer, ...]
    config: ImageConfig

    @property
    def diff_ids(self) -> list[str]:
        return [f"sha256:{layer.sha256}" for layer in self.layers]

    @property
    def layer_bytes(self) -> int:
        """What the layers add up to: the archive is this plus a few KB of headers and JSON."""
        return sum(layer.size for layer in self.layers)

    def config_json(self) -> bytes:
        return json.dumps(self.config.as_json(self.diff_ids), sort_keys=True).encode()

    def write(self, fileobj: BinaryIO) -> None:
        """Write the archive to `fileobj`, front to back (a pipe will do)."""
        config_bytes = self.config_json()
        config_name = f"{hashlib.sha256(config_bytes).hexdigest()}.json"
        layer_names = [f"{layer.sha256}/layer.tar" for layer in self.layers]
        manifest = [{"Config": config_name, "RepoTags": [self.tag], "Layers": layer_names}]
        with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT,
                          bufsize=1 << 20) as archive:
            _add_bytes(archive, config_name, config_bytes)
            for layer, name in zip(self.layers, layer_names, strict=True):
                if layer.path.stat().st_size != layer.size:
                    raise ValueError(f"{layer.path} changed since it was hashed")
                archive.add(layer.path, arcname=name)
            _add_bytes(archive, "manifest.json", json.dumps(manifest).encode())
            _add_bytes(archive, "repositories",
                       json.dumps(_repositories(self.tag, layer_names[-1])).encode())

    def save(self, out: Path) -> Path:
        partial = out.with_name(out.name + ".partial")
        out.parent.mkdir(parents=True, exist_ok=True)
        with partial.open("wb") as handle:
            self.write(handle)
        partial.replace(out)
        return out


def write_docker_archive(out: Path, tag: str, layers: list[Path], config: ImageConfig) -> Path:
    """Pack uncompressed layer tars (base first) into a Docker archive at `out` named `tag`."""
    return DockerArchive(tag, tuple(Layer.of(layer) for layer in layers), config).save(out)


def _repositories(tag: str, top_layer: str) -> dict:
    repo, _, version = tag.rpartition(":")
    return {repo: {version: top_layer.split("/", 1)[0]}}


def archive_tag(archive: Path) -> str:
    """The tag a Docker archive was written with."""
    with tarfile.open(archive) as handle:
        member = handle.extractfile("manifest.json")
        assert member is not None
        return json.load(member)[0]["RepoTags"][0]
