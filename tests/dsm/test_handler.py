"""The handler process with the QEMU stand-in (the real agent, no guest):
eviction to the target, restart under its supervisor mid-run with no data
lost, `omega dsm stats`, and Prometheus metrics.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from hypervisor.dsm.settings import DsmPaths, DsmSettings
from hypervisor.sealing import Sealer
from tests.dsm.conftest import AGENT, HOST_NODE, REPO, omega_cli
from tests.waiting import wait_for

MiB = 1 << 20


def setup_vm(config, name: str, **kw) -> DsmPaths:
    vmdir = config.vms_dir / name
    vmdir.mkdir(parents=True, exist_ok=True)
    paths = DsmPaths(vmdir)
    DsmSettings(vm_name=name, vm_id=f"vm-{name}", node=HOST_NODE, **kw).save(paths.settings)
    paths.key.write_bytes(Sealer.generate_key())
    return paths


def wait_ready(paths: DsmPaths, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 30
    while not paths.control_socket.exists():
        assert proc.poll() is None, paths.log.read_text() if paths.log.exists() else "exited"
        assert time.monotonic() < deadline
        time.sleep(0.05)


def standin(paths: DsmPaths, size: int, workload: str = "memtest") -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "hypervisor.dsm.standin", "--agent",
                             str(AGENT), "--size", str(size), "--workload", workload,
                             "--control", str(paths.control_socket)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMEGA_DSM_SOCKET": str(paths.agent_socket)})


def wait_evicted(paths: DsmPaths, work: subprocess.Popen[str], pages: int) -> None:
    """Wait until the handler has evicted ``pages`` pages while the stand-in runs."""
    from hypervisor.dsm.control import control_request

    def enough() -> bool:
        assert work.poll() is None, "the stand-in ended before enough pages were evicted"
        stats = control_request(paths.control_socket, {"op": "stats"})["stats"]
        return stats.get("evicted_pages", 0) >= pages

    wait_for(enough, timeout=120, interval=0.05, what=f"{pages} pages evicted")


def test_handler_restart_mid_run_loses_nothing(config, cluster):
    paths = setup_vm(config, "omega-test-d-restart", memory=96 * MiB, local_memory=16 * MiB,
                     slack=4 * MiB, peers=[[p.name, p.address] for p in cluster.peers])
    sup = subprocess.Popen([sys.executable, "-m", "hypervisor.cli", "dsm", "handler",
                            "omega-test-d-restart", "--supervise"], cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(paths, sup)
        work = standin(paths, 96 * MiB)
        # Kill the handler once pages live on peers.
        wait_evicted(paths, work, 4096)
        old = int(paths.handler_pid.read_text())
        os.kill(old, signal.SIGKILL)
        out, err = work.communicate(timeout=300)
        result = json.loads(out.strip().splitlines()[-1])
        assert result["ok"] and result["served"] and result["bad_words"] == 0, (out, err)
        assert "went away; re-sending" in err and "is back" in err
        assert int(paths.handler_pid.read_text()) != old
        assert "re-sent" in paths.log.read_text()
    finally:
        omega_cli("dsm", "stats", "omega-test-d-restart")  # still answers
        from hypervisor.dsm.vmhook import stop_handler

        stop_handler(paths.vmdir, free=True)
        sup.wait(timeout=20)


def test_stats_cli_and_prometheus_metrics(config):
    paths = setup_vm(config, "omega-test-d-stats", memory=32 * MiB, local_memory=8 * MiB,
                     slack=2 * MiB, store="memory")
    handler = subprocess.Popen([sys.executable, "-m", "hypervisor.cli", "dsm", "handler",
                                "omega-test-d-stats"], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        wait_ready(paths, handler)
        idle = omega_cli("dsm", "stats", "omega-test-d-stats")
        assert idle.returncode == 0 and "no guest attached" in idle.stdout
        work = standin(paths, 32 * MiB)
        out, err = work.communicate(timeout=300)
        result = json.loads(out.strip().splitlines()[-1])
        assert result["ok"] and result["served"], err
        st = result["handler"]
        assert st["max_file_resident_bytes"] <= 10 * MiB
        assert st["evicted_pages"] >= (24 * MiB) // 4096 and st["fetched_pages"] > 0
        # The stand-in's snapshot was taken while reclaim still ran; once the
        # guest is gone the handler's counters stop moving.
        def settled() -> dict | None:
            got = json.loads(omega_cli("dsm", "stats", "omega-test-d-stats", "--json").stdout)
            return None if got.get("serving") else got

        data = wait_for(settled, timeout=30, what="the handler noticing the guest left")
        assert data["evicted_pages"] >= st["evicted_pages"]
        from prometheus_client import CollectorRegistry, generate_latest

        from hypervisor.dsm.metrics import DsmMetricsCollector

        reg = CollectorRegistry()
        reg.register(DsmMetricsCollector(config))
        text = generate_latest(reg).decode()
        line = next(l for l in text.splitlines()
                    if l.startswith('omega_dsm_evicted_pages_total{vm="omega-test-d-stats"}'))
        assert float(line.split()[-1]) == data["evicted_pages"]
    finally:
        handler.terminate()
        handler.wait(timeout=20)


def test_stats_of_a_vm_without_handler_is_a_clear_error(config):
    proc = omega_cli("dsm", "stats", "omega-test-d-nobody")
    assert proc.returncode == 1
    assert "no DSM handler" in proc.stderr


def test_pages_are_freed_even_when_the_handler_is_dead(config, cluster):
    name = "omega-test-d-orphan"
    paths = setup_vm(config, name, memory=64 * MiB, local_memory=8 * MiB, slack=2 * MiB,
                     peers=[[p.name, p.address] for p in cluster.peers])
    handler = subprocess.Popen([sys.executable, "-m", "hypervisor.cli", "dsm", "handler", name],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = None
    try:
        wait_ready(paths, handler)
        work = standin(paths, 64 * MiB)
        wait_evicted(paths, work, 2048)
        handler.send_signal(signal.SIGKILL)
        handler.wait(timeout=10)
        work.kill()
        work.wait(timeout=10)
        def held_now() -> dict:
            return {p: [ns for ns in spaces if ns[0] == f"vm-{name}" and ns[1]]
                    for p, spaces in cluster.namespaces().items()}

        # Puts the dead handler had sent may still be in the peers' queues: wait
        # until what they hold stops changing.
        seen: list[dict] = []

        def stable() -> bool:
            seen.append(held_now())
            return len(seen) > 1 and seen[-1] == seen[-2]

        wait_for(stable, timeout=30, interval=0.5, what="the peers' page counts settling")
        held = seen[-1]
        assert any(held.values()), "nothing was on peers to begin with"
        from hypervisor.dsm.vmhook import stop_handler

        stop_handler(paths.vmdir, free=True, config=config)
        held = held_now()
        assert not any(held.values()), held
    finally:
        for proc in (handler, work):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
