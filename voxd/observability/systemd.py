"""systemd's notify protocol (sd_notify): READY, STATUS, STOPPING and WATCHDOG datagrams.

Written here rather than pulled in as a library: it is one datagram per message to the Unix
socket named by $NOTIFY_SOCKET ('@' = the abstract namespace). Without $NOTIFY_SOCKET (not run
by systemd) every call is a no-op. WATCHDOG=1 is sent by a task of the trio loop itself, so a
stalled loop stops the pings and systemd restarts the service.
"""

from __future__ import annotations

import logging
import os
import socket

import trio

log = logging.getLogger("voxd.systemd")


class Notifier:
    """Talks to systemd when it started us with Type=notify."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]
        self._address = address or None
        self._sock: socket.socket | None = None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_interval = (int(usec) / 1e6 / 2) if usec.isdigit() and mine else None
        """Seconds between WATCHDOG=1 pings (half of WatchdogSec), None if not asked for."""
        worker = env.get("VOXD_WORKER")
        self._tag = (f"VOXD_WORKER={worker}",) if worker is not None else ()
        """A worker tells its supervisor which worker it is."""

    @property
    def enabled(self) -> bool:
        """True when systemd is listening."""
        return self._address is not None

    def notify(self, *fields: str) -> None:
        """Send one datagram of KEY=VALUE lines (never raises: systemd may be gone)."""
        if self._address is None:
            return
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto("\n".join(fields + self._tag).encode(), self._address)
        except OSError as exc:
            log.warning("cannot notify systemd: %s", exc)

    def ready(self, status: str) -> None:
        """The service is listening."""
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        """A one-line status for `systemctl status`."""
        self.notify(f"STATUS={status}")

    def stopping(self, status: str) -> None:
        """The service is shutting down."""
        self.notify("STOPPING=1", f"STATUS={status}")

    async def watchdog(self) -> None:
        """Ping the watchdog from this event loop for as long as it runs."""
        if self.watchdog_interval is None:
            await trio.sleep_forever()
        interval = self.watchdog_interval
        assert interval is not None
        while True:
            self.notify("WATCHDOG=1")
            await trio.sleep(interval)
