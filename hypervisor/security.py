"""Cluster identity: the cluster CA, node certificates and mutual-TLS contexts.

Every node-to-node connection in Omega is TLS 1.3 with certificates on both
sides, issued by one cluster CA. Keys are EC P-256 (ECDSA with SHA-256): every
TLS stack Omega meets supports it (OpenSSL in Python, GnuTLS in QEMU's NBD
client). Node certificates carry both ``serverAuth`` and ``clientAuth`` so one
identity serves a node as a server (page and chunk service) and as a client.

Files, under ``config.cluster_dir``::

    ca.pem  ca.key (0600)           the cluster CA
    nodes/<name>.pem  <name>.key    node certificates (keys 0600)

A node certificate always names its node as a DNS SAN, so a client can check
it reached the peer it meant (``server_hostname=<peer name>``), not merely some
member of the cluster.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
import os
import re
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hypervisor.config import Config
from hypervisor.errors import AlreadyExistsError, NotFoundError, SecurityError, UsageError

CA_VALIDITY = _dt.timedelta(days=3650)
NODE_VALIDITY = _dt.timedelta(days=825)
# Clock skew between PCs of one cluster: certificates are valid a little early.
_BACKDATE = _dt.timedelta(minutes=5)

_NODE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_DNS_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def validate_node_name(name: str) -> str:
    """Check that ``name`` can name a node (and be a DNS SAN and a file name).

    Args:
        name: the proposed node name.

    Returns:
        The name unchanged.

    Raises:
        UsageError: the name is empty, too long or has other characters than
            letters, digits, ``.``, ``_`` and ``-``.
    """
    if not _NODE_NAME_RE.match(name) or ".." in name:
        raise UsageError(f"node name {name!r} is invalid (letters, digits, '.', '_', '-'; "
                         "at most 63; starting with a letter or digit)")
    return name


def parse_san(text: str) -> x509.GeneralName:
    """Turn ``10.0.0.2``, ``::1`` or ``peer1.example`` into a SubjectAltName entry.

    Args:
        text: an IP address or a DNS name (an optional ``IP:``/``DNS:`` prefix is allowed).

    Returns:
        An :class:`x509.IPAddress` or :class:`x509.DNSName`.

    Raises:
        UsageError: the text is neither.
    """
    raw = text.strip()
    kind = None
    if ":" in raw and raw.split(":", 1)[0].upper() in ("IP", "DNS"):
        kind, raw = raw.split(":", 1)
        kind = kind.upper()
    if kind in (None, "IP"):
        try:
            return x509.IPAddress(ipaddress.ip_address(raw))
        except ValueError:
            if kind == "IP":
                raise UsageError(f"SAN {text!r}: not an IP address") from None
    labels = raw.rstrip(".").split(".")
    if raw and len(raw) <= 253 and all(_DNS_LABEL_RE.match(lab) for lab in labels):
        return x509.DNSName(raw.rstrip("."))
    raise UsageError(f"SAN {text!r} is neither an IP address nor a DNS name")


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret atomically with mode 0600 (never briefly world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    # PKCS#8, unencrypted: read by OpenSSL and by GnuTLS (QEMU) alike.
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class NodeCertPaths:
    """Where one node's identity lives.

    Attributes:
        name: the node name.
        cert: its certificate (PEM).
        key: its private key (PEM, mode 0600).
        ca: the cluster CA certificate (PEM).
    """

    name: str
    cert: Path
    key: Path
    ca: Path


@dataclass(frozen=True)
class ClusterCA:
    """The cluster certificate authority: signs every node certificate.

    Attributes:
        cert: the CA certificate.
        key: the CA private key.
        cert_path: where the certificate is stored.
        key_path: where the key is stored (mode 0600).
    """

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    cert_path: Path
    key_path: Path

    @staticmethod
    def paths(config: Config) -> tuple[Path, Path]:
        """Return ``(ca.pem, ca.key)`` paths for ``config``."""
        return config.cluster_dir / "ca.pem", config.cluster_dir / "ca.key"

    @staticmethod
    def exists(config: Config) -> bool:
        """Whether a CA certificate or key is already stored."""
        cert_path, key_path = ClusterCA.paths(config)
        return cert_path.exists() or key_path.exists()

    @classmethod
    def init(cls, config: Config, *, name: str = "omega", force: bool = False) -> ClusterCA:
        """Create a new cluster CA.

        Args:
            config: where to store it.
            name: the cluster name, put in the CA's common name.
            force: replace an existing CA (every certificate it issued stops working).

        Returns:
            The new CA.

        Raises:
            AlreadyExistsError: a CA exists and ``force`` is false.
        """
        cert_path, key_path = cls.paths(config)
        if cls.exists(config) and not force:
            raise AlreadyExistsError(f"a cluster CA already exists in {config.cluster_dir} "
                                     "(use --force to replace it and invalidate its certificates)")
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Omega"),
                             x509.NameAttribute(NameOID.COMMON_NAME, f"Omega cluster CA {name}")])
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        config.cluster_dir.mkdir(parents=True, exist_ok=True)
        _write_private(key_path, _key_pem(key))
        _write_public(cert_path, _cert_pem(cert))
        return cls(cert=cert, key=key, cert_path=cert_path, key_path=key_path)

    @classmethod
    def load(cls, config: Config) -> ClusterCA:
        """Load the stored cluster CA.

        Args:
            config: where it is stored.

        Returns:
            The CA.

        Raises:
            NotFoundError: no CA exists (run ``omega cluster init``).
            SecurityError: the files are unreadable or do not belong together.
        """
        cert_path, key_path = cls.paths(config)
        if not cert_path.exists() or not key_path.exists():
            raise NotFoundError(f"no cluster CA in {config.cluster_dir} (run 'omega cluster init')")
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (ValueError, TypeError, OSError) as exc:
            raise SecurityError(f"cluster CA in {config.cluster_dir} is unreadable: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey) or \
                key.public_key().public_numbers() != cert.public_key().public_numbers():
            raise SecurityError(f"cluster CA key and certificate in {config.cluster_dir} "
                                "do not match")
        return cls(cert=cert, key=key, cert_path=cert_path, key_path=key_path)

    def sign_node(self, name: str, *, sans: Sequence[x509.GeneralName] = (),
                  key: ec.EllipticCurvePrivateKey | None = None,
                  not_before: _dt.datetime | None = None,
                  not_after: _dt.datetime | None = None,
                  usages: Iterable[x509.ObjectIdentifier] = (ExtendedKeyUsageOID.SERVER_AUTH,
                                                             ExtendedKeyUsageOID.CLIENT_AUTH),
                  ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """Sign a node certificate (without storing it).

        Args:
            name: the node name (common name and DNS SAN).
            sans: more SubjectAltName entries (IP addresses, DNS names).
            key: the node key (default: a new P-256 key).
            not_before: start of validity (default: now minus a few minutes).
            not_after: end of validity (default: :data:`NODE_VALIDITY` from now).
            usages: extended key usages (default serverAuth and clientAuth).

        Returns:
            ``(certificate, private key)``.
        """
        validate_node_name(name)
        key = key or ec.generate_private_key(ec.SECP256R1())
        now = _now()
        names: list[x509.GeneralName] = [x509.DNSName(name)]
        for san in sans:
            if san not in names:
                names.append(san)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Omega"),
                                     x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before or now - _BACKDATE)
            .not_valid_after(not_after or now + NODE_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            # keyEncipherment is meaningless for EC but QEMU's GnuTLS checks want it present
            # when keyUsage is critical.
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=True,
                data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return cert, key


def node_paths(config: Config, node_name: str) -> NodeCertPaths:
    """Return where ``node_name``'s identity is stored in ``config`` (may not exist yet)."""
    validate_node_name(node_name)
    nodes = config.cluster_dir / "nodes"
    return NodeCertPaths(name=node_name, cert=nodes / f"{node_name}.pem",
                         key=nodes / f"{node_name}.key", ca=config.cluster_dir / "ca.pem")


def issue_node_cert(config: Config, node_name: str, *, sans: Sequence[str] = (),
                    out_dir: Path | None = None, force: bool = True) -> NodeCertPaths:
    """Issue and store a certificate for a node, signed by the cluster CA.

    Args:
        config: where the CA lives (and, by default, where the certificate goes).
        node_name: the node name (also a DNS SAN).
        sans: extra SANs, each an IP address or a DNS name.
        out_dir: write ``ca.pem`` and ``nodes/<name>.pem|.key`` here instead of the
            cluster directory (a directory a peer can use as its own cluster dir).
        force: replace an existing certificate of that name.

    Returns:
        The paths written.

    Raises:
        NotFoundError: no cluster CA.
        AlreadyExistsError: the certificate exists and ``force`` is false.
        UsageError: bad node name or SAN.
    """
    validate_node_name(node_name)
    parsed = [parse_san(s) for s in sans]
    ca = ClusterCA.load(config)
    if out_dir is None:
        paths = node_paths(config, node_name)
    else:
        out_dir = Path(out_dir)
        paths = NodeCertPaths(name=node_name, cert=out_dir / "nodes" / f"{node_name}.pem",
                              key=out_dir / "nodes" / f"{node_name}.key", ca=out_dir / "ca.pem")
    if not force and (paths.cert.exists() or paths.key.exists()):
        raise AlreadyExistsError(f"a certificate for node {node_name!r} already exists "
                                 f"in {paths.cert.parent}")
    cert, key = ca.sign_node(node_name, sans=parsed)
    _write_private(paths.key, _key_pem(key))
    _write_public(paths.cert, _cert_pem(cert))
    if paths.ca != ca.cert_path:
        _write_public(paths.ca, _cert_pem(ca.cert))
    return paths


def ensure_node_cert(config: Config, node_name: str, *, sans: Sequence[str] = ()) -> NodeCertPaths:
    """Return the node's identity, issuing it (and the CA) when missing.

    Args:
        config: the cluster directory's config.
        node_name: the node.
        sans: SANs for a newly issued certificate.

    Returns:
        The node's paths.
    """
    if not ClusterCA.exists(config):
        ClusterCA.init(config)
    paths = node_paths(config, node_name)
    if paths.cert.exists() and paths.key.exists():
        cert = x509.load_pem_x509_certificate(paths.cert.read_bytes())
        have = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
        if all(parse_san(s) in have for s in sans) and cert.not_valid_after_utc > _now():
            return paths
    return issue_node_cert(config, node_name, sans=sans)


def _load_identity(ctx: ssl.SSLContext, paths: NodeCertPaths) -> None:
    for p in (paths.cert, paths.key, paths.ca):
        if not p.exists():
            raise NotFoundError(f"{p} is missing (issue it with 'omega cluster join {paths.name}')")
    try:
        ctx.load_cert_chain(str(paths.cert), str(paths.key))
        ctx.load_verify_locations(cafile=str(paths.ca))
    except (ssl.SSLError, OSError) as exc:
        raise SecurityError(f"cannot load the TLS identity of node {paths.name!r}: {exc}") from exc


def _base_context(purpose: ssl.Purpose) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH
                         else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def server_ssl_context(config: Config, *, node: str,
                       paths: NodeCertPaths | None = None) -> ssl.SSLContext:
    """A TLS 1.3 server context that requires a client certificate from the cluster CA.

    Args:
        config: the cluster directory's config.
        node: this node's name (its certificate is presented).
        paths: explicit identity files (default: those of ``node`` in ``config``).

    Returns:
        The context; only the cluster CA is trusted (no system roots).

    Raises:
        NotFoundError: the node's certificate or the CA is missing.
        SecurityError: the files cannot be loaded.
    """
    ctx = _base_context(ssl.Purpose.CLIENT_AUTH)
    _load_identity(ctx, paths or node_paths(config, node))
    return ctx


def client_ssl_context(config: Config, *, node: str, check_hostname: bool = True,
                       paths: NodeCertPaths | None = None) -> ssl.SSLContext:
    """A TLS 1.3 client context presenting ``node``'s certificate, trusting only the cluster CA.

    Args:
        config: the cluster directory's config.
        node: this node's name (its certificate is presented to servers).
        check_hostname: require the server's certificate to name the host asked for
            (connect with ``server_hostname=<peer name>``).
        paths: explicit identity files (default: those of ``node`` in ``config``).

    Returns:
        The context.

    Raises:
        NotFoundError: the node's certificate or the CA is missing.
        SecurityError: the files cannot be loaded.
    """
    ctx = _base_context(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = check_hostname
    _load_identity(ctx, paths or node_paths(config, node))
    return ctx


def write_qemu_tls_dir(config: Config, directory: Path, *, node: str) -> Path:
    """Write a QEMU ``tls-creds-x509`` directory for ``node`` (GnuTLS file names).

    The node's one certificate serves both as server and client certificate
    (it carries both usages). Keys are written with mode 0600; QEMU must run as a
    user that can read them.

    Args:
        config: the cluster directory's config.
        directory: where to write ``ca-cert.pem``, ``server-cert.pem``,
            ``server-key.pem``, ``client-cert.pem`` and ``client-key.pem``.
        node: whose identity to use.

    Returns:
        ``directory``.

    Raises:
        NotFoundError: the node's certificate or the CA is missing.
    """
    paths = node_paths(config, node)
    for p in (paths.cert, paths.key, paths.ca):
        if not p.exists():
            raise NotFoundError(f"{p} is missing (issue it with 'omega cluster join {node}')")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cert, key, ca = paths.cert.read_bytes(), paths.key.read_bytes(), paths.ca.read_bytes()
    _write_public(directory / "ca-cert.pem", ca)
    _write_public(directory / "server-cert.pem", cert)
    _write_private(directory / "server-key.pem", key)
    _write_public(directory / "client-cert.pem", cert)
    _write_private(directory / "client-key.pem", key)
    return directory


def describe_cert(path: Path) -> dict[str, object]:
    """Summarise a certificate for ``--json`` output.

    Args:
        path: a PEM certificate.

    Returns:
        subject, issuer, serial, validity and SANs.
    """
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = [str(v) for v in san.get_values_for_type(x509.DNSName)] + \
            [str(v) for v in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        sans = []
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": format(cert.serial_number, "x"),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "sans": sans,
        "sha256": cert.fingerprint(hashes.SHA256()).hex(),
    }
