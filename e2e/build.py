"""Build the real Kubernetes pieces the tests run against, from the Go module proxy.

The machine has no container images and no release downloads, only the module proxy,
so each piece is compiled from its upstream module and cached by version:

    <cache>/k8s/<version>/bin    kube-apiserver kube-controller-manager kube-scheduler kube-proxy
                                 kubelet kubectl
    <cache>/etcd/<version>/bin   etcd
    <cache>/helm/<version>/bin   helm
    <cache>/kwok/<version>/bin   kwok
    <cache>/coredns/<version>/bin coredns (cluster DNS for the real node, see e2e/node.py)
    <cache>/toolsets/<name>/bin  links to all of the above (what `bin_dir()` returns)

k8s.io/kubernetes and etcd's server carry `replace` directives, which `go install`
refuses, so they are built through a generated wrapper module. Run as
`python -m e2e.build [--version vX.Y.Z]`; a warm run only checks the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

KUBERNETES_VERSION = "v1.35.4"
ETCD_VERSION = "v3.6.16"
HELM_VERSION = "v3.22.0"
KWOK_VERSION = "v0.8.0"
COREDNS_VERSION = "v1.15.0"

K8S_STATIC = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kube-proxy", "kubectl")
K8S_BINARIES = (*K8S_STATIC, "kubelet")
ALL_BINARIES = (*K8S_BINARIES, "etcd", "helm", "kwok", "kwok-stages.yaml", "coredns")


class BuildError(RuntimeError):
    """A piece could not be built; the message says which and why."""


@dataclass(frozen=True)
class Versions:
    kubernetes: str = KUBERNETES_VERSION
    etcd: str = ETCD_VERSION
    helm: str = HELM_VERSION
    kwok: str = KWOK_VERSION
    coredns: str = COREDNS_VERSION

    @property
    def name(self) -> str:
        return (f"k8s-{self.kubernetes}_etcd-{self.etcd}_helm-{self.helm}_kwok-{self.kwok}"
                f"_coredns-{self.coredns}")


def cache_root() -> Path:
    default = Path.home() / ".cache" / "modelfleet"
    return Path(os.environ.get("MODELFLEET_CACHE_DIR", default))


def piece_bin(piece: str, version: str) -> Path:
    return cache_root() / piece / version / "bin"


def bin_dir(versions: Versions = Versions()) -> Path:
    """The folder holding every binary of this toolset (links into the per-piece caches)."""
    return cache_root() / "toolsets" / versions.name / "bin"


def missing_binaries(folder: Path | None = None) -> list[str]:
    """What the toolset folder (default: this release's) still lacks."""
    folder = folder or bin_dir()
    return [
        b for b in ALL_BINARIES
        if not os.access(folder / b, os.R_OK if b.endswith(".yaml") else os.X_OK)
    ]


def log(message: str) -> None:
    print(f"[e2e.build {time.strftime('%H:%M:%S')}] {message}", flush=True)


def go_env(cgo: bool) -> dict[str, str]:
    env = dict(os.environ)
    env["CGO_ENABLED"] = "1" if cgo else "0"
    env.setdefault("GOTOOLCHAIN", "local")
    env.setdefault("GOFLAGS", "-buildvcs=false")
    return env


def run_go(args: list[str], *, cwd: Path, cgo: bool, label: str) -> None:
    """Run a go command, echoing a line per compiled package every few seconds."""
    log(f"{label}: go {' '.join(a if len(a) < 80 else a[:77] + '...' for a in args)}")
    start = time.monotonic()
    proc = subprocess.Popen(
        ["go", *args], cwd=cwd, env=go_env(cgo), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    state = {"packages": 0, "downloads": 0, "last": ""}
    tail: list[str] = []

    def report() -> None:
        while proc.poll() is None:
            time.sleep(30)
            if proc.poll() is None:
                elapsed = time.monotonic() - start
                log(f"{label}: {elapsed:4.0f}s, {state['downloads']} modules downloaded, "
                    f"{state['packages']} packages compiled, at {state['last'] or 'linking'}")

    reporter = threading.Thread(target=report, daemon=True)
    reporter.start()
    assert proc.stdout is not None
    for line in proc.stdout:
        line = line.rstrip()
        tail = ([*tail, line])[-40:]
        if line.startswith("go: downloading "):
            state["downloads"] += 1
            state["last"] = line.removeprefix("go: ")
        elif re.match(r"^[\w.\-]+(/[\w.\-~]+)*$", line):
            state["packages"] += 1
            state["last"] = line
        else:
            print(f"  {line}", flush=True)
    if proc.wait() != 0:
        raise BuildError(f"{label}: go {args[0]} failed (exit {proc.returncode}):\n" + "\n".join(tail))
    log(f"{label}: done in {time.monotonic() - start:.0f}s")


def module_info(module: str, version: str, workdir: Path) -> dict:
    """`go mod download -json`: the module's GoMod file and source Dir in the module cache."""
    out = subprocess.run(
        ["go", "mod", "download", "-json", f"{module}@{version}"],
        cwd=workdir, env=go_env(False), capture_output=True, text=True,
    )
    info = json.loads(out.stdout or "{}")
    if out.returncode != 0 or "Dir" not in info:
        raise BuildError(f"cannot download {module}@{version}: {info.get('Error') or out.stderr}")
    return info


def module_gomod(module: str, version: str, workdir: Path) -> Path:
    return Path(module_info(module, version, workdir)["GoMod"])


def staging_replaces(gomod_text: str, version: str) -> list[str]:
    """`replace` lines pinning each staging module (required at v0.0.0) to its release tag.

    k8s.io/kubernetes vX.Y.Z publishes its staging modules as k8s.io/<m> v0.Y.Z.
    """
    staging_version = "v0." + version.removeprefix("v").split(".", 1)[1]
    staged = re.findall(r"^\s*(k8s\.io/[\w.\-/]+)\s+=>\s+\./staging/", gomod_text, re.M)
    if not staged:
        raise BuildError("k8s.io/kubernetes go.mod lists no ./staging replacements; layout changed?")
    return [f"replace {m} => {m} {staging_version}" for m in staged]


def godebug_lines(gomod_text: str) -> list[str]:
    return [line for line in gomod_text.splitlines() if line.startswith("godebug ")]


def go_directive(gomod_text: str) -> str:
    found = re.search(r"^go\s+(\S+)", gomod_text, re.M)
    return found.group(1) if found else "1.25"


def k8s_ldflags(version: str) -> str:
    major, minor = version.removeprefix("v").split(".")[:2]
    values = {
        "gitVersion": version,
        "gitMajor": major,
        "gitMinor": minor,
        "gitTreeState": "clean",
        "gitCommit": f"module-{version}",
        "buildDate": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    flags = ["-s", "-w"]
    for pkg in ("k8s.io/client-go/pkg/version", "k8s.io/component-base/version"):
        flags += [f"-X {pkg}.{key}={val}" for key, val in values.items()]
    return " ".join(flags)


def write_wrapper(src: Path, module: str, gomod: str, tools: list[str]) -> None:
    src.mkdir(parents=True, exist_ok=True)
    (src / "go.mod").write_text(gomod)
    imports = "\n".join(f'\t_ "{t}"' for t in tools)
    (src / "tools.go").write_text(
        f"//go:build tools\n\n// Package {module} pins the programs this wrapper builds.\n"
        f"package {module}\n\nimport (\n{imports}\n)\n"
    )


def build_kubernetes(version: str) -> Path:
    """Build the Kubernetes binaries this version's cache folder still lacks.

    A folder cached before a binary joined the list (kube-proxy) keeps what it has: only the
    missing programs are compiled, with the same wrapper module, and moved in beside them.
    """
    out = piece_bin("k8s", version)
    missing = [b for b in K8S_BINARIES if not os.access(out / b, os.X_OK)]
    if not missing:
        return out
    src = out.parent / "src"
    src.mkdir(parents=True, exist_ok=True)
    upstream = module_gomod("k8s.io/kubernetes", version, src).read_text()
    lines = [
        "module modelfleet.dev/e2e/kubernetes",
        "",
        f"go {go_directive(upstream)}",
        "",
        *godebug_lines(upstream),
        "",
        f"require k8s.io/kubernetes {version}",
        "",
        *staging_replaces(upstream, version),
        "",
    ]
    pkgs = {b: f"k8s.io/kubernetes/cmd/{b}" for b in K8S_BINARIES}
    gomod = "\n".join(lines)
    tools = list(pkgs.values())
    # `go mod tidy` only when the wrapper changed (a new program adds its imports).
    tools_go = src / "tools.go"
    current = tools_go.exists() and (src / "go.sum").exists() and all(
        f'"{t}"' in tools_go.read_text() for t in tools
    )
    if not current:
        write_wrapper(src, "kubernetes", gomod, tools)
        run_go(["mod", "tidy"], cwd=src, cgo=False, label=f"kubernetes {version} resolve")
    tmp = out.parent / "bin.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # Two parallel jobs: both cores busy, at most two ~2 GiB links at once.
    common = ["build", "-v", "-p", "2", "-trimpath", "-ldflags", k8s_ldflags(version), "-o", str(tmp)]
    # Upstream builds the others static (hack/lib/golang.sh KUBE_STATIC_BINARIES), kubelet with
    # cgo. The cgo pass recompiles every package (~15 min on 2 cores); MODELFLEET_KUBELET_CGO=0
    # builds the kubelet static in the same pass instead.
    kubelet_cgo = os.environ.get("MODELFLEET_KUBELET_CGO", "1") != "0"
    static = [pkgs[b] for b in missing if b != "kubelet" or not kubelet_cgo]
    if static:
        label = f"kubernetes {version} ({', '.join(b for b in missing if pkgs[b] in static)})"
        run_go([*common, *static], cwd=src, cgo=False, label=label)
    if kubelet_cgo and "kubelet" in missing:
        run_go([*common, pkgs["kubelet"]], cwd=src, cgo=True, label=f"kubernetes {version} kubelet (cgo)")
    out.mkdir(parents=True, exist_ok=True)
    for built in tmp.iterdir():
        built.replace(out / built.name)
    tmp.rmdir()
    return out


def build_coredns(version: str) -> Path:
    """CoreDNS with its default plugin set; its go.mod has no replace lines, so `go install`."""
    out = piece_bin("coredns", version)
    if os.access(out / "coredns", os.X_OK):
        return out
    out.mkdir(parents=True, exist_ok=True)
    # What upstream's Makefile sets (CGO_ENABLED=0, GitCommit through ldflags).
    ldflags = f"-s -w -X github.com/coredns/coredns/coremain.GitCommit=module-{version}"
    os.environ["GOBIN"] = str(out)
    try:
        run_go(
            ["install", "-v", "-trimpath", "-ldflags", ldflags, f"github.com/coredns/coredns@{version}"],
            cwd=out.parent, cgo=False, label=f"coredns {version}",
        )
    finally:
        os.environ.pop("GOBIN", None)
    return out


def build_etcd(version: str) -> Path:
    out = piece_bin("etcd", version)
    if os.access(out / "etcd", os.X_OK):
        return out
    src = out.parent / "src"
    src.mkdir(parents=True, exist_ok=True)
    upstream = module_gomod("go.etcd.io/etcd/server/v3", version, src).read_text()
    # The server's own replace lines point at sibling folders; a dependent module ignores
    # them and takes the released api/client/pkg modules it requires at the same version.
    gomod = (
        f"module modelfleet.dev/e2e/etcd\n\ngo {go_directive(upstream)}\n\n"
        f"require go.etcd.io/etcd/server/v3 {version}\n"
    )
    write_wrapper(src, "etcd", gomod, ["go.etcd.io/etcd/server/v3"])
    run_go(["mod", "tidy"], cwd=src, cgo=False, label=f"etcd {version} resolve")
    out.mkdir(parents=True, exist_ok=True)
    ldflags = f"-s -w -X go.etcd.io/etcd/api/v3/version.GitSHA=module-{version}"
    run_go(
        ["build", "-v", "-trimpath", "-ldflags", ldflags, "-o", str(out / "etcd"),
         "go.etcd.io/etcd/server/v3"],
        cwd=src, cgo=False, label=f"etcd {version}",
    )
    return out


def build_helm(version: str) -> Path:
    out = piece_bin("helm", version)
    if os.access(out / "helm", os.X_OK):
        return out
    out.mkdir(parents=True, exist_ok=True)
    # helm's Makefile derives the default Kubernetes version from its client-go (v0.Y -> 1.Y).
    helm_mod = module_gomod("helm.sh/helm/v3", version, out.parent).read_text()
    client_go = re.search(r"k8s\.io/client-go v0\.(\d+)\.", helm_mod)
    minor = client_go.group(1) if client_go else "35"
    ldflags = " ".join([
        "-s -w",
        f"-X helm.sh/helm/v3/internal/version.version={version}",
        "-X helm.sh/helm/v3/internal/version.gitTreeState=clean",
        *(f"-X helm.sh/helm/v3/pkg/{p}.k8sVersionMajor=1" for p in ("lint/rules", "chartutil")),
        *(f"-X helm.sh/helm/v3/pkg/{p}.k8sVersionMinor={minor}" for p in ("lint/rules", "chartutil")),
    ])
    env_bin = ["-ldflags", ldflags, f"helm.sh/helm/v3/cmd/helm@{version}"]
    os.environ["GOBIN"] = str(out)
    try:
        run_go(["install", "-v", "-trimpath", *env_bin], cwd=out.parent, cgo=False, label=f"helm {version}")
    finally:
        os.environ.pop("GOBIN", None)
    return out


# kwok acts only on the Stages it is given; these are the ones `kwokctl` installs by default
# (node-fast, heartbeat with leases, pod-fast), taken from the kwok module itself.
KWOK_STAGES = (
    "node/fast/node-initialize.yaml",
    "node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
    "pod/fast/pod-ready.yaml",
    "pod/fast/pod-complete.yaml",
    "pod/fast/pod-delete.yaml",
)


def write_kwok_stages(version: str, out: Path) -> None:
    stage_dir = Path(module_info("sigs.k8s.io/kwok", version, out.parent)["Dir"]) / "kustomize" / "stage"
    docs = [(stage_dir / name).read_text().strip() for name in KWOK_STAGES]
    (out / "kwok-stages.yaml").write_text("\n---\n".join(docs) + "\n")


def build_kwok(version: str) -> Path:
    out = piece_bin("kwok", version)
    if not os.access(out / "kwok", os.X_OK):
        out.mkdir(parents=True, exist_ok=True)
        ldflags = f"-s -w -X sigs.k8s.io/kwok/pkg/consts.Version={version.removeprefix('v')}"
        os.environ["GOBIN"] = str(out)
        try:
            run_go(
                ["install", "-v", "-trimpath", "-ldflags", ldflags,
                 f"sigs.k8s.io/kwok/cmd/kwok@{version}"],
                cwd=out.parent, cgo=False, label=f"kwok {version}",
            )
        finally:
            os.environ.pop("GOBIN", None)
    if not (out / "kwok-stages.yaml").exists():
        write_kwok_stages(version, out)
    return out


def link_toolset(versions: Versions, pieces: dict[str, Path]) -> Path:
    folder = bin_dir(versions)
    folder.mkdir(parents=True, exist_ok=True)
    for piece, src in pieces.items():
        names = {"kubernetes": K8S_BINARIES, "kwok": ("kwok", "kwok-stages.yaml")}.get(piece, (piece,))
        for name in names:
            link = folder / name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(src / name)
    return folder


def build_all(versions: Versions = Versions(), only: list[str] | None = None) -> Path:
    """Build (or find in the cache) every piece; return the toolset's bin folder."""
    if shutil.which("go") is None:
        raise BuildError("the Go toolchain (`go`) is not on PATH")
    builders = {
        "etcd": lambda: build_etcd(versions.etcd),
        "kubernetes": lambda: build_kubernetes(versions.kubernetes),
        "kwok": lambda: build_kwok(versions.kwok),
        "helm": lambda: build_helm(versions.helm),
        "coredns": lambda: build_coredns(versions.coredns),
    }
    pieces: dict[str, Path] = {}
    failures: list[str] = []
    for piece, build in builders.items():
        if only and piece not in only:
            continue
        start = time.monotonic()
        try:
            pieces[piece] = build()
        except BuildError as err:
            failures.append(str(err))
            log(f"FAILED {piece}: {err}")
            continue
        log(f"{piece}: ready in {time.monotonic() - start:.1f}s at {pieces[piece]}")
    folder = link_toolset(versions, pieces)
    if failures:
        raise BuildError("\n\n".join(failures))
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.build", description=__doc__.splitlines()[0])
    parser.add_argument("--version", default=KUBERNETES_VERSION, help="Kubernetes release, e.g. v1.35.4")
    parser.add_argument("--etcd-version", default=ETCD_VERSION)
    parser.add_argument("--helm-version", default=HELM_VERSION)
    parser.add_argument("--kwok-version", default=KWOK_VERSION)
    parser.add_argument("--coredns-version", default=COREDNS_VERSION)
    parser.add_argument("--only", action="append",
                        choices=["kubernetes", "etcd", "helm", "kwok", "coredns"])
    args = parser.parse_args(argv)
    versions = Versions(args.version, args.etcd_version, args.helm_version, args.kwok_version,
                        args.coredns_version)
    start = time.monotonic()
    try:
        folder = build_all(versions, args.only)
    except BuildError as err:
        log(f"build failed after {time.monotonic() - start:.0f}s:\n{err}")
        return 1
    log(f"all binaries ready in {time.monotonic() - start:.1f}s: {folder}")
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
