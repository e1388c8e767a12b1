"""The wrapper module is generated from the release's own go.mod, not typed by hand."""

from __future__ import annotations

from e2e import build

GOMOD = """module k8s.io/kubernetes

go 1.25.0

godebug default=go1.25

require (
\tk8s.io/api v0.0.0
\tk8s.io/client-go v0.0.0
)

replace (
\tk8s.io/api => ./staging/src/k8s.io/api
\tk8s.io/client-go => ./staging/src/k8s.io/client-go
\tk8s.io/cri-api => ./staging/src/k8s.io/cri-api
)
"""


def test_every_staging_module_is_pinned_to_the_release() -> None:
    assert build.staging_replaces(GOMOD, "v1.35.4") == [
        "replace k8s.io/api => k8s.io/api v0.35.4",
        "replace k8s.io/client-go => k8s.io/client-go v0.35.4",
        "replace k8s.io/cri-api => k8s.io/cri-api v0.35.4",
    ]
    assert build.godebug_lines(GOMOD) == ["godebug default=go1.25"]
    assert build.go_directive(GOMOD) == "1.25.0"


def test_version_ldflags_cover_both_version_packages() -> None:
    flags = build.k8s_ldflags("v1.35.4")
    for pkg in ("k8s.io/client-go/pkg/version", "k8s.io/component-base/version"):
        assert f"-X {pkg}.gitVersion=v1.35.4" in flags
        assert f"-X {pkg}.gitMajor=1" in flags
        assert f"-X {pkg}.gitMinor=35" in flags


def test_cache_folders_follow_the_versions(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MODELFLEET_CACHE_DIR", str(tmp_path))
    assert build.piece_bin("k8s", "v1.35.4") == tmp_path / "k8s" / "v1.35.4" / "bin"
    assert build.bin_dir().parent.parent == tmp_path / "toolsets"
    assert "kube-apiserver" in build.missing_binaries()
