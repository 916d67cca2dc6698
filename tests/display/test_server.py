"""Login rules, and the display served over real TLS."""

from __future__ import annotations

import datetime
import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from hypervisor.errors import SecurityError, UsageError
from hypervisor.remote_display.server import Credentials, hash_password
from hypervisor.remote_display.service import DisplayOptions, ssl_context_from


def test_roles_by_token_and_password() -> None:
    credentials = Credentials(password=hash_password("correct horse"))
    assert credentials.role_for({"token": credentials.operator_token}) == "operator"
    assert credentials.role_for({"token": credentials.viewer_token}) == "viewer"
    assert credentials.role_for({"password": "correct horse"}) == "operator"
    for body in [{"token": ""}, {"token": credentials.operator_token[:-1]}, {"token": 5},
                 {"password": "wrong"}, {"password": ""}, {}, {"token": None}]:
        assert credentials.role_for(body) is None
    assert Credentials().role_for({"password": "anything"}) is None  # no password set


def self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    import ipaddress
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def test_bad_tls_material_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="go together"):
        ssl_context_from(tmp_path / "c.pem", None)
    (tmp_path / "c.pem").write_text("not a certificate")
    with pytest.raises(SecurityError, match="cannot load TLS"):
        ssl_context_from(tmp_path / "c.pem", tmp_path / "c.pem")


@pytest.mark.libvirt
@pytest.mark.slow
def test_served_over_https_with_secure_cookie(config: Any, display_guest: Any,
                                              tmp_path: Path) -> None:
    from hypervisor.remote_display import serve_in_background

    cert, key = self_signed(tmp_path)
    handle = serve_in_background(config, display_guest.name, options=DisplayOptions(
        listen="127.0.0.1:19505", codec="h264", tls_cert=cert, tls_key=key))
    try:
        assert handle.url.startswith("https://127.0.0.1:19505/#token=")
        client = ssl.create_default_context(cafile=str(cert))
        request = urllib.request.Request(
            "https://127.0.0.1:19505/api/login",
            data=json.dumps({"token": handle.operator_token}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, context=client, timeout=30) as response:
            assert json.load(response)["role"] == "operator"
            cookie = response.headers["Set-Cookie"]
        assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
        # A client that does not trust the certificate gets no page.
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen("https://127.0.0.1:19505/", timeout=30,
                                   context=ssl.create_default_context())
    finally:
        handle.stop()
