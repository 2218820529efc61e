"""A ``socketserver`` server that waits for connections without looking for a stop.

``serve_forever(poll_interval)`` wakes every ``poll_interval`` seconds to see
whether it was asked to stop: a cost at rest, and that long added to every stop.
:class:`WakeableServer` (a mixin, first among the bases) waits on its listening
socket and on a wake-up socket of its own, with no timeout; :meth:`stop` writes to
the wake-up socket and :meth:`serve` returns at once::

    class Endpoint(WakeableServer, ThreadingHTTPServer): ...

    server = Endpoint(address, Handler)
    threading.Thread(target=server.serve).start()
    ...
    server.stop()  # from another thread; then join it, then server_close()

Used by the sidecar's local endpoint and the control server's metrics endpoint.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import socketserver
from typing import Any

__all__ = ["WakeableServer"]


class WakeableServer(socketserver.TCPServer):
    """Serves by :meth:`serve` until :meth:`stop`, idle without wake-ups."""

    timeout = 0.0
    """``handle_request`` is called once the listening socket is ready: it must not
    wait if the connection went meanwhile."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Before the bind: a failed one calls server_close, which closes them.
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_w.setblocking(False)
        self._stopping = False
        super().__init__(*args, **kwargs)

    def serve(self) -> None:
        """Accept and handle connections until :meth:`stop` (from another thread)."""
        with selectors.DefaultSelector() as selector:
            selector.register(self, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping:
                for key, _ in selector.select():
                    if key.fileobj is self:
                        self.handle_request()

    def stop(self) -> None:
        """Make :meth:`serve` return, at once (before or while it runs). Idempotent."""
        self._stopping = True
        with contextlib.suppress(OSError):  # full or closed: woken already, or gone
            self._wake_w.send(b"\0")

    def server_close(self) -> None:
        super().server_close()
        self._wake_r.close()
        self._wake_w.close()
