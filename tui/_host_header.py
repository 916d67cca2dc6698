"""One line of host facts above everything else."""

from __future__ import annotations

from textual.widgets import Static

#: Characters of the probe's reason shown (the header is one line).
REASON_WIDTH = 48


class HostHeader(Static):
    """Accelerator and libvirt URI of this host."""

    def show_facts(self, facts: dict[str, str]) -> None:
        """Render the facts.

        Args:
            facts: as :attr:`tui.ClusterView.host_facts` returns them.
        """
        reason = facts.get("reason", "")
        if len(reason) > REASON_WIDTH:
            reason = reason[:REASON_WIDTH - 1] + "…"
        self.update(f"Omega host  libvirt: {facts.get('libvirt_uri', '?')}  "
                    f"accel: {facts.get('accel', '?')} ({reason})")
