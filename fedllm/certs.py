"""Credentials of a deployment: a CA, the coordinator's TLS certificate, node key pairs.

Flower-free; uses the ``cryptography`` package only. What each file is for:

- ``ca.crt`` / ``ca.key``: the federation's own certificate authority. Nodes trust ``ca.crt``
  (SuperNode ``--root-certificates``) to verify the coordinator; ``ca.key`` signs the server
  certificate and stays with whoever runs ``fedllm certs init``.
- ``server.crt`` / ``server.key``: the SuperLink's TLS certificate (Fleet, Control and runtime
  APIs), with a subjectAltName per host name / IP address nodes use to reach it.
- ``nodes/<name>/node.key`` / ``node.pub``: a node's authentication key pair. Flower 1.39's
  SuperNode authentication needs an elliptic-curve key on a NIST curve, private key in OpenSSH
  format (``--auth-supernode-private-key``) and public key in OpenSSH format (``flwr supernode
  register``): we use P-384, as Flower's docs do.

Every private key is written 0600 and never overwritten: re-running ``init`` keeps existing
credentials (a node's registered identity must not change under it).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1")
NODE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# Certificates outlive a deployment's test phase but not forever: 825 days is the longest
# lifetime common TLS clients accept for a server certificate.
VALID_DAYS = 825


class CertsError(ValueError):
    """Bad input for credential generation (names the offending value or file)."""


@dataclass
class CertsResult:
    out_dir: Path
    created: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)

    @property
    def ca_cert(self) -> Path:
        return self.out_dir / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.out_dir / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.out_dir / "server.key"

    def node_private_key(self, name: str) -> Path:
        return node_key_paths(self.out_dir, name)[0]

    def node_public_key(self, name: str) -> Path:
        return node_key_paths(self.out_dir, name)[1]


def node_key_paths(out_dir: Path, name: str) -> tuple[Path, Path]:
    """(private key, public key) of node ``name`` under a credentials folder."""
    return out_dir / "nodes" / name / "node.key", out_dir / "nodes" / name / "node.pub"


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` 0600 from the start (no window where the key is world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o644)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: tuple[str, ...]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def _check_hosts(hosts: tuple[str, ...]) -> None:
    if not hosts:
        raise CertsError("at least one --host is needed for the server certificate")
    for h in hosts:
        if ":" in h:  # only an IPv6 address may hold colons ("host:port" is a mistake)
            try:
                ipaddress.IPv6Address(h)
                continue
            except ValueError:
                pass
        if not h or any(c.isspace() for c in h) or "/" in h or ":" in h:
            raise CertsError(f"invalid host {h!r} for the server certificate "
                             "(a DNS name or an IP address, without port)")


def _load_ca(out: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = out / "ca.crt", out / "ca.key"
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError) as e:
        raise CertsError(f"cannot read the existing CA in {out} ({e}); move the folder away "
                         "to start over") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CertsError(f"{key_path} is not an elliptic-curve key")
    return cert, key


def _new_ca(out: Path, now: dt.datetime, result: CertsResult
            ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedllm"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "fedllm federation CA")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                         crl_sign=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA384()))
    _write_private(out / "ca.key", _pem_key(key))
    _write_public(out / "ca.crt", cert.public_bytes(serialization.Encoding.PEM))
    result.created += [out / "ca.key", out / "ca.crt"]
    return cert, key


def _new_server_cert(out: Path, hosts: tuple[str, ...], ca_cert: x509.Certificate,
                     ca_key: ec.EllipticCurvePrivateKey, now: dt.datetime,
                     result: CertsResult) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedllm"),
                                     x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
            .add_extension(_san(hosts), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA384()))
    _write_private(out / "server.key", _pem_key(key))
    _write_public(out / "server.crt", cert.public_bytes(serialization.Encoding.PEM))
    result.created += [out / "server.key", out / "server.crt"]


def new_node_keys(out_dir: Path, name: str, result: CertsResult | None = None
                  ) -> tuple[Path, Path]:
    """Create node ``name``'s P-384 key pair (OpenSSH formats) unless it exists."""
    if not NODE_NAME_RE.match(name):
        raise CertsError(f"invalid node name {name!r}: letters, digits, '.', '_', '-' "
                         "(at most 64, starting with a letter or digit)")
    priv, pub = node_key_paths(out_dir, name)
    if priv.exists():
        if result is not None:
            result.kept.append(priv)
        return priv, pub
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(priv, key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()))
    _write_public(pub, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH)
                  + f" fedllm-node-{name}\n".encode())
    if result is not None:
        result.created += [priv, pub]
    return priv, pub


def init_certs(out_dir: Path, *, hosts: tuple[str, ...] = DEFAULT_HOSTS,
               nodes: tuple[str, ...] = ()) -> CertsResult:
    """Create (or complete) a deployment's credentials under ``out_dir``.

    Existing files are kept, never overwritten: the CA and server certificate are made only when
    missing (a new server certificate needs ``server.crt`` removed first), node keys only for
    node names that have none yet.
    """
    hosts = tuple(dict.fromkeys(hosts))
    _check_hosts(hosts)
    for n in nodes:
        if not NODE_NAME_RE.match(n):
            raise CertsError(f"invalid node name {n!r}: letters, digits, '.', '_', '-' "
                             "(at most 64, starting with a letter or digit)")
    out_dir.mkdir(parents=True, exist_ok=True)
    result = CertsResult(out_dir)
    now = dt.datetime.now(dt.timezone.utc)
    if (out_dir / "ca.crt").exists() or (out_dir / "ca.key").exists():
        ca_cert, ca_key = _load_ca(out_dir)
        result.kept += [out_dir / "ca.crt", out_dir / "ca.key"]
    else:
        ca_cert, ca_key = _new_ca(out_dir, now, result)
    if (out_dir / "server.crt").exists() and (out_dir / "server.key").exists():
        result.kept += [out_dir / "server.crt", out_dir / "server.key"]
    else:
        for stale in (out_dir / "server.crt", out_dir / "server.key"):
            stale.unlink(missing_ok=True)  # half a pair is useless: remake both
        _new_server_cert(out_dir, hosts, ca_cert, ca_key, now, result)
    for n in nodes:
        new_node_keys(out_dir, n, result)
    return result


def server_cert_hosts(cert_path: Path) -> list[str]:
    """The subjectAltNames of a server certificate (for messages and checks)."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(v) for v in san.get_values_for_type(x509.DNSName)] + \
        [str(v) for v in san.get_values_for_type(x509.IPAddress)]
