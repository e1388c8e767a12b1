"""Certificates and kubeconfigs for a local control plane, made with the openssl CLI.

One CA signs the API server's serving certificate and every client certificate; the
API server trusts that CA for clients, so a client's identity is its certificate's
subject (CN = user, O = groups), as in a kubeadm cluster.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

# The first address of the service range; the `kubernetes` Service gets it.
SERVICE_CIDR = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = "10.96.0.1"


def openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed: {done.stderr.strip()}")


def make_ca(pki: Path) -> None:
    pki.mkdir(parents=True, exist_ok=True)
    openssl(
        "req", "-x509", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-keyout", "ca.key", "-out", "ca.crt", "-days", "30", "-subj", "/CN=modelfleet-e2e-ca",
        cwd=pki,
    )
    # Service-account tokens are signed with an RSA key, the apiserver's default algorithm.
    openssl("genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "sa.key", cwd=pki)
    openssl("pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def make_cert(pki: Path, name: str, subject: str, *, server: bool = False) -> tuple[Path, Path]:
    """Sign `<name>.crt`/`<name>.key`; `subject` is an openssl -subj string."""
    openssl(
        "req", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject,
        cwd=pki,
    )
    ext = [
        "basicConstraints=CA:FALSE",
        "keyUsage=critical,digitalSignature,keyEncipherment",
        f"extendedKeyUsage={'serverAuth,clientAuth' if server else 'clientAuth'}",
    ]
    if server:
        names = ["IP:127.0.0.1", "DNS:localhost", f"IP:{KUBERNETES_SERVICE_IP}", "DNS:kubernetes",
                 "DNS:kubernetes.default", "DNS:kubernetes.default.svc",
                 "DNS:kubernetes.default.svc.cluster.local"]
        ext.append("subjectAltName=" + ",".join(names))
    (pki / f"{name}.ext").write_text("\n".join(ext) + "\n")
    openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", f"{name}.crt", "-days", "30", "-extfile", f"{name}.ext",
        cwd=pki,
    )
    return pki / f"{name}.crt", pki / f"{name}.key"


def write_kubeconfig(path: Path, server: str, ca: Path, cert: Path, key: Path, user: str) -> Path:
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"client-certificate": str(cert), "client-key": str(key)}}],
        "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": user}}],
        "current-context": "e2e",
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)
    return path


def make_pki(pki: Path, server: str) -> dict[str, Path]:
    """Create the CA, the serving cert and one kubeconfig per client; return their paths."""
    make_ca(pki)
    make_cert(pki, "apiserver", "/CN=kube-apiserver", server=True)
    ca = pki / "ca.crt"
    clients = {
        "admin": "/O=system:masters/CN=modelfleet-admin",
        "controller-manager": "/CN=system:kube-controller-manager",
        "scheduler": "/CN=system:kube-scheduler",
    }
    kubeconfigs = {}
    for name, subject in clients.items():
        cert, key = make_cert(pki, name, subject)
        kubeconfigs[name] = write_kubeconfig(pki / f"{name}.kubeconfig", server, ca, cert, key, name)
    return kubeconfigs
