"""TLS with QEMU's tls-creds-x509 and the cluster CA; stdin (-s) and socket-activation modes;
QEMU reconnecting across a server restart."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hypervisor.config import Config
from hypervisor.security import ClusterCA, issue_node_cert, write_qemu_tls_dir
from tests.netblock.conftest import REPO, run, start_server

PORT = 19201


@pytest.fixture
def tls_dir(nbd_tmp: Path) -> Path:
    cfg = Config(home=nbd_tmp / "ca-home")
    cfg.ensure()
    ClusterCA.init(cfg, name="n-test")
    issue_node_cert(cfg, "n-host", sans=["localhost", "127.0.0.1"])
    return write_qemu_tls_dir(cfg, nbd_tmp / "qemu-tls", node="n-host")


def test_tls_with_qemu_tls_creds(config: Config, nbd_tmp: Path, tls_dir: Path) -> None:
    server = start_server(config, nbd_tmp, "--memory", "mem:64M", "--tls-creds", str(tls_dir),
                          "--tls-required", "--listen", f"127.0.0.1:{PORT}")
    try:
        obj = f"tls-creds-x509,id=tls0,endpoint=client,dir={tls_dir}"
        unix = f"driver=nbd,server.type=unix,server.path={server.socket},export=mem," \
               "tls-creds=tls0,tls-hostname=localhost"
        tcp = f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={PORT}," \
              "export=mem,tls-creds=tls0"
        out = run("qemu-io", "--object", obj, "--image-opts", unix,
                  "-c", "write -P 0x5c 0 1M", "-c", "read -P 0x5c 0 1M", "-c", "flush").stdout
        assert "fail" not in out.lower(), out
        out = run("qemu-io", "--object", obj, "--image-opts", tcp,
                  "-c", "read -P 0x5c 0 1M").stdout
        assert "fail" not in out.lower(), out
        src = nbd_tmp / "src.raw"
        src.write_bytes(os.urandom(4 << 20))
        run("qemu-img", "convert", "-n", "--object", obj, "--target-image-opts", "-f", "raw",
            str(src), tcp)
        dst = nbd_tmp / "dst.raw"
        run("qemu-img", "convert", "--object", obj, "--image-opts", tcp, "-O", "raw", str(dst))
        assert hashlib.sha256(dst.read_bytes()[:4 << 20]).digest() == \
            hashlib.sha256(src.read_bytes()).digest()
        # plaintext clients are refused (TLS required), and so is a client without a cert
        plain = run("qemu-io", "-f", "raw", "-c", "read 0 4k", server.uri("mem"), check=False)
        assert plain.returncode != 0
        assert "TLS" in plain.stderr + plain.stdout
        info = run("nbdinfo", "--json", f"nbds+unix:///mem?socket={server.socket}"
                   f"&tls-certificates={tls_dir}", check=False)
        assert info.returncode == 0 and json.loads(info.stdout)["TLS"] is True, info.stderr
    finally:
        assert server.stop() == 0


def test_tcp_off_loopback_requires_tls(omega) -> None:
    proc = omega("netblock", "serve", "--memory", "m:1M", "--listen", "0.0.0.0:19202")
    assert proc.returncode == 2 and "TLS" in proc.stderr


def test_stdin_mode(config: Config) -> None:
    code = ("h.connect_command(" + repr([sys.executable, "-m", "hypervisor.cli", "netblock",
                                         "serve", "-s", "--memory", "m:16M"]) + ")\n"
            "h.pwrite(b'q' * 4096, 8192)\n"
            "assert h.pread(4096, 8192) == b'q' * 4096\n"
            "assert h.get_size() == 16 << 20\n"
            "print('ok')\n")
    env = {**os.environ, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO),
           "OMEGA_HOME": str(config.home)}
    proc = subprocess.run(["nbdsh", "-c", code], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    assert proc.stdout.strip() == "ok", proc.stderr


def test_socket_activation(config: Config) -> None:
    code = ("h.connect_systemd_socket_activation(" + repr(
        [sys.executable, "-m", "hypervisor.cli", "netblock", "serve", "--memory", "m:16M"])
        + ")\nh.pwrite(b'z' * 512, 0)\nassert h.pread(512, 0) == b'z' * 512\nprint('ok')\n")
    env = {**os.environ, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO),
           "OMEGA_HOME": str(config.home)}
    proc = subprocess.run(["nbdsh", "-c", code], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    assert proc.stdout.strip() == "ok", proc.stderr


def test_qemu_reconnects_across_restart(config: Config, omega, nbd_tmp: Path) -> None:
    omega("netblock", "create", "n-reconnect", "16M", "--local", check=True)
    sock = nbd_tmp / "rc.sock"
    server = start_server(config, nbd_tmp, "n-reconnect", socket=sock)
    opts = f"driver=nbd,server.type=unix,server.path={sock},export=n-reconnect,reconnect-delay=20"
    qio = subprocess.Popen(["qemu-io", "--image-opts", opts], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert qio.stdin is not None
        qio.stdin.write("write -P 0x61 0 64k\n")
        qio.stdin.flush()
        first = qio.stdout.readline()  # type: ignore[union-attr]
        assert "wrote" in first, first
        assert server.stop() == 0  # drains and closes; nothing answers with ESHUTDOWN
        server = start_server(config, nbd_tmp, "n-reconnect", socket=sock)
        qio.stdin.write("read -P 0x61 0 64k\nwrite -P 0x62 64k 64k\nread -P 0x62 64k 64k\n")
        out, _ = qio.communicate(timeout=120)
        assert qio.returncode == 0
        assert out.count("read 65536/65536") == 2 and "fail" not in out.lower(), out
    finally:
        if qio.poll() is None:
            qio.kill()
        server.stop()
        omega("netblock", "delete", "n-reconnect")


def test_captive_run_copies_in_and_out_and_exits_with_the_commands_status(
        omega, nbd_tmp: Path) -> None:
    """--run (as nbdkit --run): the command gets $uri and friends for a private
    socket, real clients use it, and the server exits with the command's status."""
    src = nbd_tmp / "cap-src.raw"
    src.write_bytes(os.urandom(3 << 20))
    dst = nbd_tmp / "cap-dst.raw"
    seen = nbd_tmp / "cap-env.txt"
    command = (f'qemu-img convert -n -f raw -O raw {src} "$uri" && '
               f'qemu-img convert -f raw -O raw "$uri" {dst} && '
               f'nbdinfo --json "$uri" > {nbd_tmp}/cap-info.json && '
               f'printf "%s\\n" "$unixsocket" "$exportname" "$exports" > {seen}; exit 3')
    proc = omega("netblock", "serve", "--memory", "cap:8M", "--run", command, timeout=180)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr == ""  # captive mode does not announce itself
    assert dst.read_bytes()[:3 << 20] == src.read_bytes()
    assert dst.stat().st_size == 8 << 20
    info = json.loads((nbd_tmp / "cap-info.json").read_text())
    assert info["exports"][0]["export-size"] == 8 << 20
    unixsocket, name, names = seen.read_text().splitlines()
    assert (name, names) == ("cap", "cap")
    assert not Path(unixsocket).exists() and not Path(unixsocket).parent.exists()


def test_captive_run_serves_stored_exports_and_their_data_stays(
        config: Config, omega, nbd_tmp: Path) -> None:
    omega("netblock", "create", "n-captive", "16M", "--local", check=True)
    sock = nbd_tmp / "captive.sock"
    try:
        write = omega("netblock", "serve", "n-captive", "--socket", str(sock), "--run",
                      'qemu-io -f raw -c "write -P 0x7e 1M 2M" -c flush "$uri"', timeout=180)
        assert write.returncode == 0 and "wrote 2097152/2097152" in write.stdout, write.stderr
        assert not sock.exists()
        read = omega("netblock", "serve", "n-captive", "--run",
                     'qemu-io -f raw -c "read -P 0x7e 1M 2M" -c "read -P 0 0 1M" "$uri"',
                     timeout=180)
        assert read.returncode == 0, read.stderr
        assert read.stdout.count("read ") == 2 and "fail" not in read.stdout.lower()
        failed = omega("netblock", "serve", "n-captive", "--run",
                       'qemu-io -f raw -c "read -P 0x7f 1M 4k" "$uri"', timeout=180)
        assert failed.returncode == 1 and "Pattern verification failed" in failed.stdout
    finally:
        omega("netblock", "delete", "n-captive")


def test_captive_run_stops_its_command_on_sigterm_and_writes_a_pidfile(
        config: Config, nbd_tmp: Path) -> None:
    pidfile = nbd_tmp / "cap.pid"
    child = nbd_tmp / "cap-child.pid"
    env = {**os.environ, "OMEGA_HOME": str(config.home), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "hypervisor.cli", "netblock", "serve",
                             "--memory", "m:4M", "-P", str(pidfile), "--run",
                             f'echo $$ > {child}; exec sleep 600'],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            if child.exists() and child.read_text().strip() and pidfile.exists():
                break
            assert proc.poll() is None, proc.stderr.read()  # type: ignore[union-attr]
            time.sleep(0.1)
        assert int(pidfile.read_text()) == proc.pid
        sleeper = int(child.read_text())
        os.kill(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        assert "SIGTERM to the --run command" in proc.stderr.read()  # type: ignore[union-attr]
        assert not pidfile.exists()
        with pytest.raises(ProcessLookupError):
            os.kill(sleeper, 0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("args, message", [
    (["-s", "--run", "true"], "cannot serve stdin"),
    (["-P", "/nonexistent-dir/x.pid", "--run", "true"], "cannot write the pid file"),
])
def test_captive_run_bad_options_fail_with_one_clear_error(omega, args: list[str],
                                                           message: str) -> None:
    proc = omega("netblock", "serve", "--memory", "m:1M", *args)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_exit_with_parent_drains_and_exits_when_its_parent_does(config: Config,
                                                                 nbd_tmp: Path) -> None:
    sock, pidfile = nbd_tmp / "ewp.sock", nbd_tmp / "ewp.pid"
    serve = [sys.executable, "-m", "hypervisor.cli", "netblock", "serve", "--memory", "m:4M",
             "--socket", str(sock), "-P", str(pidfile), "--exit-with-parent"]
    parent = ("import subprocess, time, pathlib\n"
              f"p = subprocess.Popen({serve!r}, stdout=subprocess.DEVNULL)\n"
              f"f = pathlib.Path({str(pidfile)!r})\n"
              "for _ in range(600):\n"
              "    if f.exists(): break\n"
              "    time.sleep(0.1)\n"
              "print(p.pid, flush=True)\n")  # and exit, leaving the server behind
    env = {**os.environ, "OMEGA_HOME": str(config.home), "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", parent], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    server = int(out.strip())
    for _ in range(300):  # SIGTERM from the kernel: the server drains and exits
        if not os.path.exists(f"/proc/{server}") or \
                open(f"/proc/{server}/stat").read().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        os.kill(server, signal.SIGKILL)
        raise AssertionError("the server outlived its parent")
    assert not sock.exists() and not pidfile.exists()
