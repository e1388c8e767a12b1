"""A small strategic merge: the user's podTemplate overlay applied to a built pod template.

Lists of named things (containers, volumes, env, volumeMounts) merge item by item on `name`,
ports on `containerPort`; other lists (tolerations, args) are appended or replaced as
Kubernetes' strategic merge patch would for the PodSpec fields users overlay in practice.
"""

from __future__ import annotations

import copy
from typing import Any

_MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
}
_APPEND = {"tolerations"}


def merge(base: Any, overlay: Any, key: str | None = None) -> Any:
    """`overlay` merged into a copy of `base`."""
    if isinstance(base, dict) and isinstance(overlay, dict):
        out = copy.deepcopy(base)
        for k, v in overlay.items():
            out[k] = merge(out[k], v, k) if k in out else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(overlay, list):
        if key in _APPEND:
            return copy.deepcopy(base) + [copy.deepcopy(v) for v in overlay if v not in base]
        merge_key = _MERGE_KEYS.get(key or "")
        if merge_key is None:
            return copy.deepcopy(overlay)
        out = copy.deepcopy(base)
        index = {item.get(merge_key): i for i, item in enumerate(out) if isinstance(item, dict)}
        for item in overlay:
            at = index.get(item.get(merge_key)) if isinstance(item, dict) else None
            if at is None:
                out.append(copy.deepcopy(item))
            else:
                out[at] = merge(out[at], item, None)
        return out
    return copy.deepcopy(overlay)
