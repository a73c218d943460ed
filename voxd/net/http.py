"""The HTTP side (webhook, health, metrics): Hypercorn's HTTP/1.1 connection handling, fed
connections by the front door instead of its own accept loop.

This uses Hypercorn's trio building blocks (`TCPServer`, `Lifespan`, `WorkerContext`) the way
its own `worker_serve` does; pyproject pins the Hypercorn versions this was checked against.
"""

from __future__ import annotations

from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import wrap_app


class HttpServer:
    """Serves an ASGI app on connections handed to `handle`, between `run`'s start and end."""

    def __init__(self, app: Any, config: HypercornConfig) -> None:
        self.config = config
        self.app = wrap_app(app, config.wsgi_max_body_size, "asgi")
        self.context = WorkerContext(None)
        self.state: dict[str, Any] = {}

    async def run(self, stop: trio.Event,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The app's lifespan: start it, serve until `stop`, then close idle keep-alive
        connections and shut the app down."""
        lifespan = Lifespan(self.app, self.config, self.state)
        async with trio.open_nursery() as nursery:
            await nursery.start(lifespan.handle_lifespan)
            await lifespan.wait_for_startup()
            task_status.started()
            await stop.wait()
            await self.context.terminated.set()  # idle keep-alive connections close now
            await lifespan.wait_for_shutdown()
            nursery.cancel_scope.cancel()

    async def handle(self, stream: trio.abc.HalfCloseableStream) -> None:
        """Serve one connection until it closes."""
        await TCPServer(self.app, self.config, self.context, ConnectionState(self.state.copy()),
                        stream).run()  # type: ignore[arg-type]  # any trio stream works
