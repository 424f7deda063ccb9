"""A loopback HTTP server for the tests: a ThreadingHTTPServer on 127.0.0.1 at a free port, served from a thread."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from http.server import ThreadingHTTPServer
from typing import Any, Callable, Iterator, Self


class LoopbackServer(ThreadingHTTPServer):
    """`handler` on 127.0.0.1 at a free port; `url` is its base. `with server.running():` serves it."""

    request_queue_size = 64  # socketserver's 5 drops the connects of 8+ workers at once: 1 s SYN retries

    def __init__(self, handler: Callable[..., Any]):
        super().__init__(("127.0.0.1", 0), handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    @contextmanager
    def running(self) -> Iterator[Self]:
        thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.shutdown()
            self.server_close()
            thread.join()
