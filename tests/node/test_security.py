"""Cluster CA, node certificates and mutual TLS, over real TLS connections."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import stat
import subprocess
import time
from pathlib import Path

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from hypervisor.config import Config
from hypervisor.errors import AlreadyExistsError, NotFoundError, UsageError
from hypervisor.security import (
    ClusterCA,
    NodeCertPaths,
    _cert_pem,
    _key_pem,
    client_ssl_context,
    issue_node_cert,
    parse_san,
    server_ssl_context,
    write_qemu_tls_dir,
)

from .conftest import free_port


async def _echo_works(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, *,
                      server_hostname: str) -> bool:
    """Run a TLS echo server and try one round trip; True when it succeeds."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            data = await reader.read(100)
            writer.write(data)
            await writer.drain()
        except (ssl.SSLError, ConnectionError):
            pass
        finally:
            writer.close()

    port = free_port()
    server = await asyncio.start_server(handle, "127.0.0.1", port, ssl=server_ctx)
    try:
        try:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_ctx, server_hostname=server_hostname)
        except (ssl.SSLError, ConnectionError):
            return False
        try:
            writer.write(b"hello")
            await writer.drain()
            got = await asyncio.wait_for(reader.read(100), 10)
            return got == b"hello"
        except (ssl.SSLError, ConnectionError):
            return False
        finally:
            writer.close()
    finally:
        server.close()
        await server.wait_closed()


def _write_identity(dirpath: Path, ca: ClusterCA, name: str, **kwargs) -> NodeCertPaths:
    cert, key = ca.sign_node(name, sans=[parse_san("127.0.0.1")], **kwargs)
    dirpath.mkdir(parents=True, exist_ok=True)
    paths = NodeCertPaths(name, dirpath / f"{name}.pem", dirpath / f"{name}.key",
                          dirpath / "ca.pem")
    paths.cert.write_bytes(_cert_pem(cert))
    paths.key.write_bytes(_key_pem(key))
    paths.ca.write_bytes(_cert_pem(ca.cert))
    return paths


@pytest.fixture
def two_nodes(config: Config, cluster_ca: ClusterCA) -> tuple[str, str]:
    issue_node_cert(config, "sec-server", sans=["127.0.0.1"])
    issue_node_cert(config, "sec-client", sans=["127.0.0.1"])
    return "sec-server", "sec-client"


async def test_mutual_tls_between_cluster_nodes(config: Config, two_nodes) -> None:
    srv, cli = two_nodes
    assert await _echo_works(server_ssl_context(config, node=srv),
                             client_ssl_context(config, node=cli), server_hostname=srv)


async def test_client_checks_it_reached_the_named_peer(config: Config, two_nodes) -> None:
    srv, cli = two_nodes
    # The server is a cluster member, but not the one the client asked for.
    assert not await _echo_works(server_ssl_context(config, node=srv),
                                 client_ssl_context(config, node=cli), server_hostname=cli)


async def test_client_from_foreign_ca_is_refused(config: Config, two_nodes,
                                                 tmp_path: Path) -> None:
    srv, _ = two_nodes
    foreign_cfg = Config(home=tmp_path / "foreign")
    foreign = ClusterCA.init(foreign_cfg, name="foreign")
    paths = _write_identity(tmp_path / "f", foreign, "intruder")
    # The intruder trusts our CA (so it would accept our server) but its cert is foreign.
    paths.ca.write_bytes(config.cluster_dir.joinpath("ca.pem").read_bytes())
    ctx = client_ssl_context(foreign_cfg, node="intruder", paths=paths)
    assert not await _echo_works(server_ssl_context(config, node=srv), ctx, server_hostname=srv)


async def test_server_from_foreign_ca_is_refused(config: Config, two_nodes,
                                                 tmp_path: Path) -> None:
    _, cli = two_nodes
    foreign = ClusterCA.init(Config(home=tmp_path / "foreign"), name="foreign")
    paths = _write_identity(tmp_path / "f", foreign, "sec-server")
    ctx = server_ssl_context(config, node="sec-server", paths=paths)
    assert not await _echo_works(ctx, client_ssl_context(config, node=cli),
                                 server_hostname="sec-server")


async def test_expired_client_certificate_is_refused(config: Config, two_nodes,
                                                     cluster_ca: ClusterCA,
                                                     tmp_path: Path) -> None:
    srv, _ = two_nodes
    now = dt.datetime.now(dt.timezone.utc)
    paths = _write_identity(tmp_path / "old", cluster_ca, "old-node",
                            not_before=now - dt.timedelta(days=30),
                            not_after=now - dt.timedelta(days=1))
    ctx = client_ssl_context(config, node="old-node", paths=paths)
    assert not await _echo_works(server_ssl_context(config, node=srv), ctx, server_hostname=srv)


async def test_server_only_certificate_cannot_act_as_client(config: Config, two_nodes,
                                                            cluster_ca: ClusterCA,
                                                            tmp_path: Path) -> None:
    srv, _ = two_nodes
    paths = _write_identity(tmp_path / "eku", cluster_ca, "server-only",
                            usages=[ExtendedKeyUsageOID.SERVER_AUTH])
    ctx = client_ssl_context(config, node="server-only", paths=paths)
    assert not await _echo_works(server_ssl_context(config, node=srv), ctx, server_hostname=srv)


async def test_client_only_certificate_cannot_act_as_server(config: Config, two_nodes,
                                                            cluster_ca: ClusterCA,
                                                            tmp_path: Path) -> None:
    _, cli = two_nodes
    paths = _write_identity(tmp_path / "eku2", cluster_ca, "client-only",
                            usages=[ExtendedKeyUsageOID.CLIENT_AUTH])
    ctx = server_ssl_context(config, node="client-only", paths=paths)
    assert not await _echo_works(ctx, client_ssl_context(config, node=cli),
                                 server_hostname="client-only")


def test_tls_contexts_require_tls13_and_certificates(config: Config, two_nodes) -> None:
    srv, cli = two_nodes
    for ctx in (server_ssl_context(config, node=srv), client_ssl_context(config, node=cli)):
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
        assert ctx.verify_mode == ssl.CERT_REQUIRED


def test_keys_are_private(config: Config, two_nodes) -> None:
    srv, _ = two_nodes
    for p in (config.cluster_dir / "ca.key", config.cluster_dir / "nodes" / f"{srv}.key"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600


def test_ca_init_refuses_to_overwrite(config: Config, cluster_ca: ClusterCA) -> None:
    before = cluster_ca.cert_path.read_bytes()
    with pytest.raises(AlreadyExistsError):
        ClusterCA.init(config)
    assert cluster_ca.cert_path.read_bytes() == before


def test_missing_identity_is_a_clear_error(config: Config, cluster_ca: ClusterCA) -> None:
    with pytest.raises(NotFoundError, match="omega cluster join nobody"):
        server_ssl_context(config, node="nobody")
    with pytest.raises(UsageError):
        issue_node_cert(config, "../etc")
    with pytest.raises(UsageError):
        issue_node_cert(config, "ok", sans=["not a name!"])


def test_qemu_tls_dir_works_with_qemu_gnutls(config: Config, cluster_ca: ClusterCA,
                                             tmp_path: Path) -> None:
    """QEMU (GnuTLS) serves and reads an NBD export with the written credentials."""
    issue_node_cert(config, "qemu-node", sans=["127.0.0.1"])
    creds = write_qemu_tls_dir(config, tmp_path / "tls", node="qemu-node")
    names = sorted(p.name for p in creds.iterdir())
    assert names == ["ca-cert.pem", "client-cert.pem", "client-key.pem", "server-cert.pem",
                     "server-key.pem"]
    assert stat.S_IMODE((creds / "server-key.pem").stat().st_mode) == 0o600
    disk = tmp_path / "disk.raw"
    disk.write_bytes(b"\0" * (1 << 20))
    port = free_port()
    server = subprocess.Popen(
        ["qemu-nbd", "--object", f"tls-creds-x509,id=tls0,dir={creds},endpoint=server",
         "--tls-creds", "tls0", "-f", "raw", "-b", "127.0.0.1", "-p", str(port), "-t",
         str(disk)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out = None
        for _ in range(50):
            proc = subprocess.run(
                ["qemu-img", "info", "--object",
                 f"tls-creds-x509,id=tls0,dir={creds},endpoint=client", "--image-opts",
                 f"driver=nbd,host=127.0.0.1,port={port},tls-creds=tls0"],
                capture_output=True, text=True, timeout=30)
            if proc.returncode == 0:
                out = proc.stdout
                break
            if server.poll() is not None:
                break
            time.sleep(0.1)
        assert out is not None, f"qemu-img failed: {proc.stderr} / server: " \
            f"{server.stderr.read().decode() if server.poll() is not None else 'running'}"
        assert "virtual size: 1 MiB" in out
    finally:
        server.terminate()
        server.wait(10)
