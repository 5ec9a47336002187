"""fedllm/certs.py: a deployment's CA, server certificate and node keys."""

from __future__ import annotations

import ssl

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from fedllm.certs import CertsError, init_certs, server_cert_hosts
from fedllm.config import ConfigError, load_node_config


def test_init_creates_private_keys_0600_and_keeps_existing(tmp_path):
    r = init_certs(tmp_path / "c", hosts=("coordinator", "10.0.0.5"), nodes=("a", "b"))
    assert len(r.created) == 8 and not r.kept
    for p in (r.out_dir / "ca.key", r.server_key, r.node_private_key("a")):
        assert p.stat().st_mode & 0o777 == 0o600
    before = r.node_private_key("a").read_bytes(), r.ca_cert.read_bytes()
    again = init_certs(tmp_path / "c", nodes=("a", "c"))
    # Registered identities never change under a node; only the new node is added.
    assert (r.node_private_key("a").read_bytes(), r.ca_cert.read_bytes()) == before
    assert sorted(p.name for p in again.created) == ["node.key", "node.pub"]
    assert again.created[0].parent.name == "c"


def test_server_certificate_is_signed_by_ca_with_sans(tmp_path):
    r = init_certs(tmp_path, hosts=("coordinator", "127.0.0.1"))
    assert sorted(server_cert_hosts(r.server_cert)) == ["127.0.0.1", "coordinator"]
    ca = x509.load_pem_x509_certificate(r.ca_cert.read_bytes())
    srv = x509.load_pem_x509_certificate(r.server_cert.read_bytes())
    srv.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not srv.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    # The server certificate and key form a usable TLS pair; the CA loads as a trust root.
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(r.server_cert, r.server_key)
    ssl.create_default_context(cafile=str(r.ca_cert))


def test_node_keys_are_what_flower_supernode_auth_loads(tmp_path):
    r = init_certs(tmp_path, nodes=("n1",))
    priv = load_ssh_private_key(r.node_private_key("n1").read_bytes(), None)
    pub = load_ssh_public_key(r.node_public_key("n1").read_bytes())
    assert isinstance(priv, ec.EllipticCurvePrivateKey) and priv.curve.name == "secp384r1"
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    assert pub.public_numbers() == priv.public_key().public_numbers()


@pytest.mark.parametrize("kwargs, needle", [
    ({"nodes": ("../evil",)}, "invalid node name '../evil'"),
    ({"hosts": ("bad host",)}, "invalid host 'bad host'"),
    ({"hosts": ("coordinator:9092",)}, "invalid host 'coordinator:9092'"),
    ({"hosts": ()}, "at least one --host"),
])
def test_bad_input_is_named_and_writes_nothing(tmp_path, kwargs, needle):
    with pytest.raises(CertsError, match=needle.replace("(", r"\(")):
        init_certs(tmp_path / "c", **kwargs)
    assert not (tmp_path / "c").exists()


def test_node_connection_needs_tls_and_a_key_unless_explicit(tmp_path):
    base = '[node]\nname = "a"\n[data]\npath = "x.tsv"\n[connection]\n'
    f = tmp_path / "node.toml"
    f.write_text(base + 'auth_private_key = "k"\n')
    with pytest.raises(ConfigError, match="connection.root_certificates is needed for TLS"):
        load_node_config(f)
    f.write_text(base + 'root_certificates = "ca.crt"\n')
    with pytest.raises(ConfigError, match="auth_private_key is needed"):
        load_node_config(f)
    f.write_text(base + 'auth_private_key = "k"\ninsecure = true\n')
    assert load_node_config(f).connection.insecure
    f.write_text(base + 'superlink = "no-port"\nauth_private_key = "k"\ninsecure = true\n')
    with pytest.raises(ConfigError, match="connection.superlink"):
        load_node_config(f)
