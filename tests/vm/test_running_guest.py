"""Read-only checks on one booted guest: command output, virsh, show/list, console, metrics."""

from __future__ import annotations

import json
import os
import pty
import select
import socket
import subprocess
import sys
import time
import urllib.request

from tests.conftest import REPO, run_omega
from tests.vm.conftest import BootedVM, run_output, virsh


def test_guest_ran_command_and_reported_marker(booted_vm: BootedVM):
    assert booted_vm.marker.startswith("OMEGA-GUEST-READY mem_kb=")
    assert booted_vm.marker.endswith("cpus=2")
    output, rc = run_output(booted_vm.serial_log.read_text(errors="replace"))
    assert rc == 0
    assert output.splitlines() == ["guest-says-42", "2", "/dev/vda"]


def test_virsh_list_and_dominfo_see_the_domain(booted_vm: BootedVM):
    assert booted_vm.name in virsh("list", "--name").stdout.split()
    info = dict(line.split(":", 1) for line in virsh("dominfo", booted_vm.name).stdout.splitlines()
                if ":" in line)
    assert info["State"].strip() == "running"
    assert info["CPU(s)"].strip() == "2"
    assert info["Max memory"].strip() == "262144 KiB"
    assert "omega:vm" in virsh("dumpxml", booted_vm.name).stdout


def test_show_and_list_json(booted_vm: BootedVM, omega):
    shown = json.loads(omega("vm", "show", booted_vm.name, "--json", check=True).stdout)
    assert shown["state"] == "running"
    assert shown["vcpus"] == 2 and shown["memory"] == 256 << 20
    assert shown["accel"] in ("tcg", "kvm")
    assert shown["disks"][0]["target"] == "vda"
    assert shown["runtime_dir"].endswith(f"/vms/{booted_vm.name}")
    listed = json.loads(omega("vm", "list", "--json", check=True).stdout)
    assert {"name": booted_vm.name, "state": "running"}.items() <= next(
        r for r in listed if r["name"] == booted_vm.name).items()
    human = omega("vm", "show", booted_vm.name, check=True).stdout
    assert "state:" in human and "running" in human


def test_console_until_matches_and_times_out(booted_vm: BootedVM, omega):
    hit = omega("vm", "console", booted_vm.name, "--until", r"guest-says-\d+", "--timeout", "30")
    assert hit.returncode == 0, hit.stderr
    assert "guest-says-42" in hit.stdout
    miss = omega("vm", "console", booted_vm.name, "--until", "never-printed", "--timeout", "1")
    assert miss.returncode == 1
    assert miss.stderr.strip().startswith("omega: error:") and len(miss.stderr.splitlines()) == 1
    bad = omega("vm", "console", booted_vm.name, "--until", "(", "--timeout", "1")
    assert bad.returncode == 2


def test_interactive_console_runs_a_command(booted_vm: BootedVM):
    """Drive `omega vm console` through a pty like a user: type, read, Ctrl-]."""
    pid, fd = pty.fork()
    if pid == 0:  # child: the real CLI on a terminal
        os.chdir(REPO)
        os.execv(sys.executable, [sys.executable, "-m", "hypervisor.cli", "vm", "console",
                                  booted_vm.name])
    seen = b""

    def read_until(needle: bytes, limit: float) -> bool:
        nonlocal seen
        end = time.monotonic() + limit
        while needle not in seen and time.monotonic() < end:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    seen += os.read(fd, 4096)
                except OSError:
                    break
        return needle in seen

    try:
        assert read_until(b"escape character is ^]", 30), seen
        # The guest shell may still be printing; send until it answers.
        answered = False
        for _ in range(5):
            os.write(fd, b"echo console-$((20+3))\r")
            if read_until(b"console-23", 6):
                answered = True
                break
        assert answered, seen.decode(errors="replace")
        os.write(fd, b"\x1d")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        try:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(fd)


def test_metrics_endpoint_serves_vm_metrics(booted_vm: BootedVM):
    port = 19101
    proc = subprocess.Popen([sys.executable, "-m", "hypervisor.cli", "metrics", "serve",
                             "--listen", f"127.0.0.1:{port}"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline, "metrics server did not listen"
                time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
            assert resp.status == 200
            body = resp.read().decode()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    vm = f'vm="{booted_vm.name}"'
    lines = body.splitlines()
    assert f"omega_vm_state{{{vm}}} 1.0" in lines
    vcpu = next(ln for ln in lines if ln.startswith("omega_vm_vcpu_seconds_total{") and vm in ln)
    assert float(vcpu.rsplit(" ", 1)[1]) > 0
    assert any(ln.startswith("omega_vm_memory_bytes{") and 'kind="maximum"' in ln and vm in ln
               and float(ln.rsplit(" ", 1)[1]) == 256 << 20 for ln in lines)
    assert any(ln.startswith("omega_vm_memory_bytes{") and 'kind="rss"' in ln and vm in ln
               for ln in lines)
    assert any(ln.startswith("omega_vm_info{") and vm in ln and 'image="tiny"' in ln
               for ln in lines)


def test_metrics_listen_is_validated():
    bad = run_omega("metrics", "serve", "--listen", "nonsense")
    assert bad.returncode == 2 and "HOST:PORT" in bad.stderr
