"""Where the store lives: storage URLs (default, normalised, masked), the SQLAlchemy engine for SQLite or
PostgreSQL with the checks that make a bad `--storage` one clear line, the schema migrations and the lock that
serialises creating them."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from tuner.core.errors import TunerError

# The databases the store runs on: the check of a URL and its error message both come from here.
DIALECTS = {"sqlite": "sqlite:///PATH (a file)", "postgresql": "postgresql://USER@HOST/DB (psycopg 3)"}
SCHEMA_LOCK_KEY = 7_318_442_019  # pg_advisory_lock key of schema creation


def default_url() -> str:
    """$TUNER_STORAGE, else one SQLite file per user, so every command finds the same studies."""
    env = os.environ.get("TUNER_STORAGE")
    if env:
        return env
    base = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "unlearn-tuner"
    return f"sqlite:///{base / 'studies.db'}"


def normalise_url(url: str) -> str:
    """postgresql:// means psycopg 3 here; a bare path means a SQLite file."""
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().resolve()}"
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql+psycopg://" + url.split("://", 1)[1]
    return url


def safe_url(url: str) -> str:
    """The URL with any password masked, for logs and pages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<invalid storage URL>"


def what_works() -> str:
    """The storage URLs this store supports, for error messages."""
    return "use " + " or ".join(DIALECTS.values())


def engine_for(url: str, create_folder: bool = False) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise TunerError(f"--storage: not a database URL: {safe_url(url)} ({what_works()})") from None
    backend = parsed.get_backend_name()
    if backend not in DIALECTS:
        raise TunerError(f"storage {safe_url(url)}: '{backend}' databases are not supported; {what_works()}")
    try:
        return _create_engine(url, parsed, create_folder)
    except (ImportError, NoSuchModuleError) as err:  # a driver named in the URL that is not installed
        driver = getattr(err, "name", None) or parsed.get_driver_name()
        raise TunerError(f"storage {safe_url(url)}: database driver '{driver}' is not available; "
                         f"{what_works()}") from None


def _create_engine(url: str, parsed, create_folder: bool) -> Engine:
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            _sqlite_folder(Path(parsed.database), create_folder)
        engine = create_engine(url, connect_args={"timeout": 60})

        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _record) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def _sqlite_folder(database: Path, create: bool) -> None:
    """The default store's folder is created on first use; an explicit URL's folder must exist (a typo in
    --storage must not silently start a new, empty store somewhere) and be writable."""
    folder = database.parent
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TunerError(f"storage: cannot create folder {folder} for the SQLite store "
                             f"({err.strerror or type(err).__name__})") from None
    if not folder.is_dir():
        raise TunerError(f"storage: folder {folder} of the SQLite file {database.name} does not exist "
                         "(create it first, or fix --storage)")
    if database.is_dir():
        raise TunerError(f"storage: {database} is a directory, not a SQLite file")
    if not os.access(folder, os.W_OK | os.X_OK) or (database.exists() and not os.access(database, os.R_OK | os.W_OK)):
        raise TunerError(f"storage: {database if database.exists() else folder} is not writable")


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to `revision` (the newest by default; tests build older stores with an older one)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


@contextlib.contextmanager
def schema_lock(engine: Engine) -> Iterator[None]:
    """Serialise schema creation between processes opening one new database at once (two studies on one
    SQLite file): a lock file beside SQLite, an advisory lock on PostgreSQL."""
    if engine.dialect.name == "sqlite":
        database = engine.url.database
        if not database or database == ":memory:":
            yield
            return
        with open(f"{database}.lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)
    elif engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": SCHEMA_LOCK_KEY})
    else:
        yield


def refuse_foreign(url: str, tables: list[str], create: bool) -> None:
    """A database without the store's tables: reading commands never create them, and no command writes
    them into a database that another program's tables already fill."""
    if not create:
        raise TunerError(f"no store at {safe_url(url)}: the database has no tuner tables "
                         "(run `tuner study run` first, or fix --storage)")
    if tables:
        shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        raise TunerError(f"storage {safe_url(url)} holds another program's tables ({shown}); give the store its "
                         "own SQLite file or an empty database")


def first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[0] if lines else ""


def mask_password(text: str, url: str | None) -> str:
    """`text` with the password of the storage `url` masked: drivers (and errors that reach the command line)
    may echo the connection string in their messages."""
    try:
        password = make_url(url).password if url else None
    except (ArgumentError, ValueError):  # not a URL: nothing to hide
        return text
    return text.replace(str(password), "***") if password else text


