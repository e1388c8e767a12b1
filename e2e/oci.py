"""Docker image archives without Docker: layer tars + a config, packed as `docker save` would.

containerd's `ctr images import` reads this format (a tar holding `manifest.json`, the config
JSON whose `rootfs.diff_ids` are the sha256 of the uncompressed layer tars, and the layers).

    write_docker_archive(out, "localhost/modelfleet/pause:3.10", [layer_tar], ImageConfig(...))
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

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


def write_docker_archive(out: Path, tag: str, layers: list[Path], config: ImageConfig) -> Path:
    """Pack uncompressed layer tars (base first) into a Docker archive at `out` named `tag`."""
    diff_ids = [f"sha256:{sha256_file(layer)}" for layer in layers]
    config_bytes = json.dumps(config.as_json(diff_ids), sort_keys=True).encode()
    config_name = f"{hashlib.sha256(config_bytes).hexdigest()}.json"
    layer_names = [f"{d.split(':', 1)[1]}/layer.tar" for d in diff_ids]
    manifest = [{"Config": config_name, "RepoTags": [tag], "Layers": layer_names}]
    partial = out.with_name(out.name + ".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as archive:
        _add_bytes(archive, config_name, config_bytes)
        for layer, name in zip(layers, layer_names, strict=True):
            archive.add(layer, arcname=name)
        _add_bytes(archive, "manifest.json", json.dumps(manifest).encode())
        _add_bytes(archive, "repositories", json.dumps(_repositories(tag, layer_names[-1])).encode())
    partial.replace(out)
    return out


def _repositories(tag: str, top_layer: str) -> dict:
    repo, _, version = tag.rpartition(":")
    return {repo: {version: top_layer.split("/", 1)[0]}}


def archive_tag(archive: Path) -> str:
    """The tag a Docker archive was written with."""
    with tarfile.open(archive) as handle:
        member = handle.extractfile("manifest.json")
        assert member is not None
        return json.load(member)[0]["RepoTags"][0]
