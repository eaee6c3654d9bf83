"""Helpers for tests that start real servers (Ray nodes, PostgreSQL) beside the study."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from tuner.core.errors import TunerError
from tuner.store import Store


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_step(store: Store, name: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Until study `name`'s running trial has reported a curve point: a fault then lands mid-training."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            running = [r for r in store.trials(name) if r["status"] == "running"]
        except TunerError:  # the study row is not there yet
            running = []
        if running and store.curve(running[0]["id"]):
            return
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.2)
    pytest.fail("the trial never reported a curve point")
