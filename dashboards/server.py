"""Serving the dashboards with waitress: a production WSGI server, pure Python, one process with threads.

Flask's built-in server is for development (it says so on start) and `tuner dashboard` is what the compose
file's dashboard service runs. One process, not gunicorn's workers: the study cache and its prefetch live in
the process, so a page's callbacks find the study its HTML request started building.
"""

from __future__ import annotations

import signal
import threading

THREADS = 8  # a cold page asks for ~15 files at once; the threads mostly wait on sockets, not the CPU


def create(app, host: str, port: int, channels: dict | None = None):
    """A waitress server for a Dash app, bound (port 0: a free one, see `.effective_port`) but not yet run.
    `channels`: the socket map its loop serves (waitress's `map=`; the listening socket and every open
    connection are registered in it), for a caller that has to close them."""
    from waitress import create_server

    return create_server(app.server, map={} if channels is None else channels, host=host, port=port,
                         threads=THREADS, ident="unlearn-tuner", clear_untrusted_proxy_headers=True)


def serve(app, host: str, port: int) -> None:
    """Serve until Ctrl+C."""
    take_back_sigint()
    server = create(app, host, port)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        server.task_dispatcher.shutdown()


class BackgroundServer:
    """The same server on 127.0.0.1 (a free port) in a thread until `stop()`: for the browser tests, the
    screenshots and the load benchmark, so they exercise what `tuner dashboard` runs."""

    def __init__(self, app) -> None:
        self.channels: dict = {}
        self.server = create(app, "127.0.0.1", 0, self.channels)
        self.url = f"http://127.0.0.1:{self.server.effective_port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        # closing every channel (the listening socket and open connections) empties the loop's map, so
        # `run` returns; then the worker threads are told to finish
        for channel in list(self.channels.values()):
            channel.close()
        self.server.task_dispatcher.shutdown()
        self.thread.join(10)


def take_back_sigint() -> None:
    """A process inherits an ignored or blocked SIGINT from the one that started it (a script's background
    job, a supervisor, a Ray driver's process), and Python then never raises KeyboardInterrupt: Ctrl+C and
    `kill -INT` would not stop the dashboards. Take SIGINT back in the main thread."""
    if threading.current_thread() is threading.main_thread():
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        signal.signal(signal.SIGINT, signal.default_int_handler)
