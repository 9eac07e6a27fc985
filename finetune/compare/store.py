"""`--store PATH`: workers on any number of machines share one comparison.

Each worker is the same `python -m benchmarks.compare ... --store PATH` command (PATH an
SQLite file on a disk every worker sees, or `sqlite:///PATH`). The store holds the settings
and one record per (strategy, seed): who runs it, until when its claim holds, and its
results row once done. Claiming and finishing are SQLite transactions, so two workers can
never both claim a run, and a row is kept only from the worker whose claim still held:
- a worker claims each run nobody has, and renews its claims while it trains (a thread);
- a claim whose worker stopped renewing (killed, machine gone) lapses after LEASE_SECONDS
  and the next worker to look runs it again: no run is lost;
- a finished row is written in the same transaction that checks the claim, so a worker
  whose claim lapsed and was taken cannot add a second row: none is doubled;
- a worker with nothing left to claim waits for the runs others hold, then writes the whole
  comparison to its --output; so every worker ends with the same report.
Failed runs stay failed (their error recorded) until a worker starts with --resume.

Under torchrun a worker is its processes together: rank 0 talks to the store and the others
follow its answers.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from finetune.compare.row import Row
from finetune.errors import redact
from finetune.runtime import distributed

LEASE_SECONDS = float(os.environ.get("FINETUNE_COMPARE_LEASE", 600))
SCHEMA = """
CREATE TABLE IF NOT EXISTS settings (id INTEGER PRIMARY KEY CHECK (id = 0), config TEXT);
CREATE TABLE IF NOT EXISTS runs (
    strategy TEXT, seed INTEGER, state TEXT, worker TEXT, token TEXT, lease_until REAL,
    row TEXT, error TEXT, attempts INTEGER DEFAULT 0, PRIMARY KEY (strategy, seed));
"""
TAKEN = "taken"  # what a claimed run returns where another worker has it (or has done it)


class StoreError(Exception):
    """The store cannot be used at all (read-only, not an SQLite file, a folder): every
    worker stops at once with this one line, where a busy store is waited for."""


# sqlite3's words for a store no retry can fix (a locked or busy one is retried)
_UNUSABLE = ("readonly", "read-only", "not a database", "unable to open", "malformed",
             "disk i/o error", "is a directory")


@contextmanager
def usable(path: Path) -> Iterator[None]:
    """Turn sqlite3's error for a store that cannot work into a StoreError naming it."""
    try:
        yield
    except sqlite3.DatabaseError as error:
        reason = str(error)
        if not any(word in reason.lower() for word in _UNUSABLE):
            raise
        raise StoreError(
            f"--store {path}: {reason}; give a writable SQLite file (a new path is created) "
            "on a disk every worker sees") from None


def store_path(spec: str) -> Path:
    """`--store`'s value as a file: a path, or an sqlite:/// URL. Other databases need a
    server this project does not depend on."""
    if "://" not in spec:
        return Path(spec).expanduser()
    if not spec.startswith("sqlite:///"):
        raise SystemExit(f"--store {spec}: only SQLite stores are supported, as a file path "
                         "or sqlite:///path/to/store.db on a disk every worker sees")
    return Path(spec[len("sqlite:///"):]).expanduser()


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class SharedStore:
    """One comparison's runs in an SQLite file that several workers use at once."""

    def __init__(self, path: str | Path, worker: str | None = None) -> None:
        self.path = Path(path)
        self.worker = worker or worker_name()
        if self.path.is_dir():
            raise StoreError(f"--store {self.path} is a folder; give a file path inside it, "
                             f"e.g. {self.path / 'store.db'}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._transaction() as db:
            for statement in SCHEMA.split(";"):
                db.execute(statement)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: BEGIN IMMEDIATE takes the database's write lock first,
        so a read-then-update (a claim) cannot interleave with another worker's."""
        with usable(self.path):
            db = sqlite3.connect(self.path, timeout=120, isolation_level=None)
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    yield db
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                db.execute("COMMIT")
            finally:
                db.close()

    def adopt(self, config: dict[str, Any], changed: Callable[[dict[str, Any]], list[str]]
              ) -> None:
        """Record the comparison's settings (first worker), or refuse a worker whose
        settings differ where rows would not be comparable (`changed` names them)."""
        with self._transaction() as db:
            held = db.execute("SELECT config FROM settings").fetchone()
            if held is None:
                db.execute("INSERT INTO settings VALUES (0, ?)", (json.dumps(config),))
                return
        differ = changed(json.loads(held[0]))
        if differ:
            raise SystemExit(f"--store {self.path} holds a comparison with other settings "
                             f"({', '.join(differ)}); use the same settings or another store")

    def claim(self, strategy: str, seed: int, retry_failed: bool = False,
              now: float | None = None) -> str | None:
        """A token for running (strategy, seed), or None where it is done, failed (unless
        `retry_failed`) or claimed by a worker whose lease holds."""
        now = time.time() if now is None else now
        token = uuid.uuid4().hex
        with self._transaction() as db:
            held = db.execute("SELECT state, lease_until FROM runs WHERE strategy=? AND seed=?",
                              (strategy, seed)).fetchone()
            if held is not None:
                state, lease_until = held
                free = (state == "running" and lease_until < now) or (
                    state == "failed" and retry_failed)
                if not free:
                    return None
            db.execute(
                "INSERT INTO runs (strategy, seed, state, worker, token, lease_until, attempts) "
                "VALUES (?, ?, 'running', ?, ?, ?, 1) ON CONFLICT (strategy, seed) DO UPDATE "
                "SET state='running', worker=excluded.worker, token=excluded.token, "
                "lease_until=excluded.lease_until, error=NULL, attempts=attempts + 1",
                (strategy, seed, self.worker, token, now + LEASE_SECONDS))
        return token

    def renew(self, token: str, now: float | None = None) -> bool:
        """Extend a claim; False once another worker has taken it over."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            return db.execute("UPDATE runs SET lease_until=? WHERE token=? AND state='running'",
                              (now + LEASE_SECONDS, token)).rowcount == 1

    def finish(self, token: str, row: Row | dict[str, Any] | None = None,
               error: str | None = None) -> bool:
        """Keep a run's row (or its error) if `token` still holds its claim; False (nothing
        written) where the claim lapsed and another worker took the run over."""
        plain = row.to_dict() if isinstance(row, Row) else row
        state, value = ("done", json.dumps(plain, default=str)) if error is None else (
            "failed", None)
        with self._transaction() as db:
            return db.execute(
                "UPDATE runs SET state=?, row=?, error=?, lease_until=0 WHERE token=? AND "
                "state='running'", (state, value, error, token)).rowcount == 1

    def release(self, token: str) -> None:
        """Give a claim up at once (Ctrl-C): the next worker that looks may run it."""
        with self._transaction() as db:
            db.execute("UPDATE runs SET lease_until=0 WHERE token=? AND state='running'",
                       (token,))

    def records(self) -> list[tuple[str, int, str, str | None, str | None, float]]:
        """(strategy, seed, state, row JSON, error, lease_until) of every run recorded."""
        with usable(self.path):
            db = sqlite3.connect(self.path, timeout=120)
            try:
                return db.execute("SELECT strategy, seed, state, row, error, lease_until "
                                  "FROM runs").fetchall()
            finally:
                db.close()

    def rows(self) -> list[Row]:
        return [Row.from_dict(json.loads(row)) for _, _, state, row, _, _ in self.records()
                if state == "done" and row is not None]

    def failures(self) -> list[Row]:
        return [Row.failure(strategy, seed, error)
                for strategy, seed, state, _, error, _ in self.records() if state == "failed"]

    def open_runs(self, runs: list[tuple[str, int]], now: float | None = None
                  ) -> tuple[list[tuple[str, int]], float]:
        """Of `runs`, those neither done nor failed, and the soonest a claim among them
        lapses (a waiting worker looks again then, or sooner)."""
        now = time.time() if now is None else now
        state = {(s, seed): (st, lease) for s, seed, st, _, _, lease in self.records()}
        waiting = [run for run in runs if state.get(run, ("", 0))[0] not in ("done", "failed")]
        lapse = min((state[run][1] for run in waiting if run in state), default=now)
        return waiting, lapse


class Claims:
    """A worker's side of the store, the same on each of its processes: rank 0 asks the
    store and the others take its answers, so every process trains the same runs."""

    def __init__(self, path: Path, retry_failed: bool = False) -> None:
        self.path, self.retry_failed = path, retry_failed
        self.worker = distributed.same_as_main(worker_name())
        self.store = SharedStore(path, self.worker) if distributed.is_main() else None

    def _agreed(self, ask: Callable[[SharedStore], Any]) -> Any:
        return distributed.same_as_main(ask(self.store) if self.store is not None else None)

    def adopt(self, config: dict[str, Any], changed: Callable[[dict[str, Any]], list[str]]
              ) -> None:
        def check(shared: SharedStore) -> str:
            try:
                shared.adopt(config, changed)
            except SystemExit as refusal:
                return str(refusal)
            return ""

        refusal = self._agreed(check)
        if refusal:
            raise SystemExit(refusal)

    def rows(self) -> list[Row]:
        return self._agreed(SharedStore.rows)

    def failures(self) -> list[Row]:
        return self._agreed(SharedStore.failures)

    def open_runs(self, runs: list[tuple[str, int]]) -> tuple[list[tuple[str, int]], float]:
        return self._agreed(lambda shared: shared.open_runs(runs))

    def runner(self, run: Callable[..., dict[str, Any]]) -> Callable[..., Any]:
        """`run` behind this worker's claims (picklable, for a `--jobs` pool)."""
        return functools.partial(run_claimed, run=run, store=str(self.path),
                                 worker=self.worker, retry_failed=self.retry_failed)


class Lease:
    """Renews a claim from a thread while the run trains, so a long run keeps it."""

    def __init__(self, store: SharedStore, token: str) -> None:
        self.store, self.token = store, token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew, daemon=True)

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_SECONDS / 4):
            try:
                if not self.store.renew(self.token):
                    return
            except sqlite3.Error:
                continue  # a busy or unreachable store: the next renewal tries again
            except StoreError:
                return  # the run's own finish says so, once


def run_claimed(spec: str, seed: int, *, run: Callable[..., dict[str, Any]], store: str,
                worker: str, retry_failed: bool, **shared: Any) -> dict[str, Any] | str:
    """`run(spec, seed, **shared)` if this worker claims it (TAKEN where another has it),
    the row kept in the store when the claim still holds. Module-level, with the store by
    path, so a `--jobs` pool worker can run it."""
    shared_store = SharedStore(store, worker) if distributed.is_main() else None
    token = distributed.same_as_main(
        shared_store.claim(spec, seed, retry_failed) if shared_store is not None else None)
    if token is None:
        return TAKEN
    try:
        with Lease(shared_store, token) if shared_store is not None else nullcontext():
            row = run(spec, seed, **shared)
    except Exception as error:
        if shared_store is not None:
            shared_store.finish(token, error=redact(repr(error)))
        raise
    except BaseException:  # Ctrl-C, a stopped comparison: the run is not this worker's now
        if shared_store is not None:
            shared_store.release(token)
        raise
    kept = distributed.same_as_main(
        shared_store.finish(token, row) if shared_store is not None else None)
    return row if kept else TAKEN
