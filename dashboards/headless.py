"""The app on a free loopback port in a thread, and the flags for the system's headless Chromium: shared by
the screenshots, the load benchmark and the browser tests."""

from __future__ import annotations

import threading

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]


class BackgroundServer:
    """Serves a Dash app's Flask server on 127.0.0.1 (a free port) until `stop()`."""

    def __init__(self, app) -> None:
        from werkzeug.serving import make_server

        self.httpd = make_server("127.0.0.1", 0, app.server, threaded=True)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.thread.join(10)
