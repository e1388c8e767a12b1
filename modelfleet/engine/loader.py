"""Model URIs to local directories, and safetensors weights into a (sharded) model.

Each rank opens the safetensors files lazily and copies only its own slices, so no rank
ever holds a whole-model copy.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from modelfleet.engine.errors import InvalidConfig
from modelfleet.engine.layers.loading import default_weight_loader

log = logging.getLogger(__name__)

HF_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer*"]


def resolve_model_path(uri: str) -> Path:
    """builtin://, file://, hf://org/name[@revision], or a plain directory -> a local directory."""
    if uri.startswith("builtin://"):
        from modelfleet.engine.builtin import materialize

        return materialize(uri)
    if uri.startswith("hf://"):
        return _download_hf(uri.removeprefix("hf://"))
    if "://" in uri and not uri.startswith("file://"):
        raise InvalidConfig(
            "model", f"unsupported URI scheme in {uri!r} (builtin://, file://, hf:// or a directory)"
        )
    path = Path(uri.removeprefix("file://")).expanduser()
    if not (path / "config.json").is_file():
        raise InvalidConfig("model", f"{path} is not a model directory (no config.json)")
    return path


def _download_hf(spec: str) -> Path:
    repo, _, revision = spec.partition("@")
    if repo.count("/") != 1:
        raise InvalidConfig("model", f"hf:// URIs look like hf://org/name[@revision], got hf://{spec}")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, revision=revision or None, allow_patterns=HF_PATTERNS))
    except Exception as e:  # offline, unknown repo, gated model: say which and why
        raise InvalidConfig(
            "model",
            f"cannot fetch hf://{spec} ({type(e).__name__}: {e}); without network access only "
            "models already in the Hugging Face cache load (set HF_HUB_OFFLINE=1 to use it)",
        ) from e


def safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / n for n in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise InvalidConfig("model", f"{path} holds no *.safetensors weights")
    return files


def load_weights(model: nn.Module, path: Path, show_progress: bool = True) -> None:
    """Copy every checkpoint tensor into the matching (packed, sharded) parameter."""
    params = dict(model.named_parameters(remove_duplicate=False))
    packed = getattr(model, "packed_modules", {})
    tied = getattr(model, "tied", False)
    loaded: set[str] = set()
    files = safetensors_files(path)
    progress = _progress(len(files), show_progress)
    for i, file in enumerate(files):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if "rotary_emb.inv_freq" in name or (tied and name == "lm_head.weight"):
                    continue
                target, shard = name, None
                for src, (dst, shard_id) in packed.items():
                    if f".{src}." in name:
                        target, shard = name.replace(f".{src}.", f".{dst}."), shard_id
                        break
                param = params.get(target)
                if param is None:
                    raise ValueError(f"checkpoint tensor {name} has no place in the model")
                loader = getattr(param, "weight_loader", default_weight_loader)
                loader(param, f.get_slice(name), *(() if shard is None else (shard,)))
                loaded.add(target)
        progress(i + 1, file.name)
    missing = {n for n in params if n not in loaded and not (tied and n == "lm_head.weight")}
    if missing:
        raise ValueError(f"checkpoint {path} lacks weights for {sorted(missing)[:5]}")


def _progress(total: int, show: bool):
    def report(done: int, name: str) -> None:
        if show:
            log.info("loaded weights %d/%d (%s)", done, total, name)
            if sys.stderr.isatty() and total > 1:
                print(f"\rloading weights {done}/{total}", end="\n" if done == total else "",
                      file=sys.stderr, flush=True)

    return report


def checkpoint_bytes(path: Path) -> int:
    return sum(os.path.getsize(f) for f in safetensors_files(path))


def build_model(model_cls: type[nn.Module], cfg, dtype: torch.dtype, device: str) -> nn.Module:
    """Construct the model straight on its device in its dtype (no float32 CPU detour)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = model_cls(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()
