"""Riding out a database that is briefly away (a PostgreSQL restart, a failover, a locked SQLite file).

A study's trials keep running on their workers while the database is away; only the driver's writes wait.
Losing a study of GPU-hours because the database restarted for a minute is worse than waiting for it.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy.exc import InterfaceError, OperationalError

T = TypeVar("T")
log = logging.getLogger("tuner.store")
TRANSIENT: tuple[type[BaseException], ...] = (OperationalError, InterfaceError)


def patience_s() -> float:
    """How long to wait for the database before giving up: $TUNER_STORE_RETRY_S, default 5 minutes."""
    return float(os.environ.get("TUNER_STORE_RETRY_S", "300"))


def with_retry(call: Callable[[], T], what: str, transient: tuple[type[BaseException], ...] = TRANSIENT) -> T:
    """`call()`, repeated with backoff while it fails with a transient database error, for up to
    `patience_s()`; then the last error is raised."""
    deadline, delay, warned = time.monotonic() + patience_s(), 0.25, False
    while True:
        try:
            result = call()
        except transient as err:
            if time.monotonic() + delay > deadline:
                raise
            if not warned:
                first = str(getattr(err, "orig", None) or err).strip().splitlines()[:1] or [type(err).__name__]
                log.warning("database unavailable while %s (%s); retrying for up to %.0f s", what, first[0][:200],
                            patience_s())
                warned = True
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
            continue
        if warned:
            log.warning("database back; %s done", what)
        return result


def retrying(method: Callable[..., T]) -> Callable[..., T]:
    """Decorator for idempotent store methods: each retry is a new transaction."""

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        return with_retry(lambda: method(*args, **kwargs), method.__name__.replace("_", " "))

    return wrapper
