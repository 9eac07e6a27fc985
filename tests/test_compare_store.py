"""`finetune compare --store`: workers sharing one comparison through one SQLite file claim
each run once, take over runs whose worker stopped, and all end with every row."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks import compare
from finetune.compare import store
from finetune.compare.store import SharedStore
from finetune.model.backbone import Backbone
from tests.conftest import finish_all, make_tiny_backbone, make_tree
from tests.test_compare import Factory, argv

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300


def slow_tiny_backbone(num_classes: int) -> Backbone:
    """The tiny backbone, a second late: runs long enough that two workers share them."""
    time.sleep(1.0)
    return make_tiny_backbone(num_classes)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tree(tmp_path_factory.mktemp("store"), classes=3, n_train=6, n_test=2)


def test_a_run_is_claimed_once_and_a_lapsed_claim_changes_hands(tmp_path: Path):
    first, second = SharedStore(tmp_path / "s.db", "a"), SharedStore(tmp_path / "s.db", "b")
    token = first.claim("last-layer", 0, now=100.0)
    assert token is not None
    assert second.claim("last-layer", 0, now=100.0 + store.LEASE_SECONDS - 1) is None
    assert first.renew(token, now=100.0 + store.LEASE_SECONDS - 1)  # still renewing: held
    assert second.claim("last-layer", 0, now=100.0 + store.LEASE_SECONDS + 1) is None
    later = 100.0 + 2 * store.LEASE_SECONDS  # the first worker stopped renewing: it lapsed
    taken = second.claim("last-layer", 0, now=later)
    assert taken is not None and not first.renew(token, now=later)
    assert not first.finish(token, {"strategy": "last-layer", "seed": 0, "device": "a"})
    assert second.finish(taken, {"strategy": "last-layer", "seed": 0, "device": "b"})
    assert [row.device for row in first.rows()] == ["b"]  # one row, from the claim that held
    assert second.claim("last-layer", 0, now=later) is None  # done: nobody runs it again
    third = first.claim("bitfit", 0, now=later)
    first.release(third)  # given up (Ctrl-C): free at once, not after the lease
    assert second.claim("bitfit", 0, now=later) is not None


RACED = [(strategy, seed) for strategy in ("a", "b", "c", "d") for seed in range(10)]


def _claim_everything(path: str, name: str, start: Any, results: Any) -> None:
    """A worker that, once all are ready, claims and finishes every run it can."""
    shared, claimed, kept = SharedStore(path, name), [], []
    start.wait()
    for strategy, seed in RACED:
        token = shared.claim(strategy, seed)
        if token is not None:
            claimed.append((strategy, seed))
            if shared.finish(token, {"strategy": strategy, "seed": seed}):
                kept.append((strategy, seed))
    results.put((name, claimed, kept))


@pytest.mark.subprocess
def test_four_racing_workers_claim_each_run_exactly_once(tmp_path: Path):
    """Real processes on one SQLite file, released together, each trying every run: every
    run is won by exactly one of them (which one varies), and the store keeps one row each."""
    path = str(tmp_path / "race.db")
    SharedStore(path)
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(4), context.Queue()
    workers = [context.Process(target=_claim_everything, args=(path, f"w{i}", start, results))
               for i in range(4)]
    for worker in workers:
        worker.start()
    reports = [results.get(timeout=TIMEOUT_S) for _ in workers]
    for worker in workers:
        worker.join(timeout=TIMEOUT_S)
    claimed = [run for _, runs, _ in reports for run in runs]
    kept = [run for _, _, runs in reports for run in runs]
    assert sorted(claimed) == sorted(kept) == sorted(RACED)  # none trained twice, none lost
    assert len(SharedStore(path).rows()) == len(RACED)


def test_a_failed_run_stays_failed_until_a_worker_resumes(tmp_path: Path):
    shared = SharedStore(tmp_path / "s.db")
    assert shared.finish(shared.claim("bitfit", 1), error="RuntimeError('boom')")
    assert [(f.strategy, f.seed, f.failed, f.error) for f in shared.failures()] == [
        ("bitfit", 1, True, "RuntimeError('boom')")]
    assert shared.claim("bitfit", 1) is None
    assert shared.claim("bitfit", 1, retry_failed=True) is not None
    assert shared.open_runs([("bitfit", 1), ("bitfit", 2)])[0] == [("bitfit", 1), ("bitfit", 2)]


def test_a_worker_with_other_settings_or_another_store_url_is_refused(tree: Path,
                                                                      tmp_path: Path):
    db = tmp_path / "s.db"
    assert compare.main(argv(tree, tmp_path / "a", "--strategies", "last-layer", "--tune",
                             "none", "--store", str(db)), backbone_factory=Factory()) == 0
    with pytest.raises(SystemExit, match=r"other settings .*epochs: 1 -> 2"):
        compare.main(argv(tree, tmp_path / "b", "--strategies", "last-layer", "--tune", "none",
                          "--epochs", "2", "--store", f"sqlite:///{db}"),
                     backbone_factory=Factory())
    with pytest.raises(SystemExit, match="only SQLite"):
        compare.main(argv(tree, tmp_path / "c", "--tune", "none", "--store",
                          "postgresql://host/db"), backbone_factory=Factory())


def test_a_run_whose_worker_died_is_run_again_and_kept_once(tree: Path, tmp_path: Path):
    """A claim left by a worker that stopped renewing long ago (killed with its run) is
    taken over; the run is kept once, on its second attempt."""
    db = tmp_path / "s.db"
    SharedStore(db, "dead-worker").claim("last-layer", 0, now=0.0)
    assert compare.main(argv(tree, tmp_path / "out", "--strategies", "last-layer,bitfit",
                             "--tune", "none", "--store", str(db)),
                        backbone_factory=Factory()) == 0
    records = {(s, seed): state for s, seed, state, *_ in SharedStore(db).records()}
    assert records == {("last-layer", 0): "done", ("bitfit", 0): "done"}
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert sorted(r["strategy"] for r in rows) == ["bitfit", "last-layer"]
    # the worker started again on its folder: --resume, nothing left to train
    factory = Factory()
    assert compare.main(argv(tree, tmp_path / "out", "--strategies", "last-layer,bitfit",
                             "--tune", "none", "--store", str(db), "--resume"),
                        backbone_factory=factory) == 0
    assert factory.calls == []
    again = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert [r["test_predictions"] for r in again] == [r["test_predictions"] for r in rows]


@pytest.mark.distributed
def test_two_workers_sharing_a_store_run_every_row_exactly_once(tree: Path, tmp_path: Path):
    """Two workers started at once, one of them two data-parallel processes under torchrun:
    each run is trained by one worker (its lr searched there), and both end with the whole
    comparison."""
    db = tmp_path / "sweep.db"
    common = ["--data", str(tree), "--backbone", "tests.test_compare_store:slow_tiny_backbone",
              "--epochs", "1", "--batch-size", "4",
              "--image-size", "32", "--workers", "0", "--precision", "fp32", "--device", "cpu",
              "--tune", "lr", "--lr-grid", "1e-3,1e-2", "--seeds", "2", "--strategies",
              "last-layer,bitfit,full-unfreeze", "--store", str(db)]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}

    def start(name: str, *extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "finetune", "compare", *common,
                                 "--output", str(tmp_path / name), *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=env, cwd=ROOT)

    workers = [start("two", "--nproc", "2")]  # slower to start: it goes first
    deadline = time.monotonic() + TIMEOUT_S
    while not (db.exists() and SharedStore(db).records()):  # until it holds a run
        if workers[0].poll() is not None or time.monotonic() > deadline:
            pytest.fail("the torchrun worker claimed nothing: "
                        + workers[0].communicate()[1][-3000:])
        time.sleep(0.2)
    workers.append(start("one", "--jobs", "1"))
    outputs = [done.stdout for done in finish_all(workers, TIMEOUT_S, "a --store worker")]
    trained = [match for out in outputs
               for match in re.findall(r"\] (\S+) seed (\d): val", out)]
    runs = {(s, str(seed)) for s in ("last-layer", "bitfit", "full-unfreeze") for seed in (0, 1)}
    assert sorted(trained) == sorted(runs)  # each run trained once, by one of the workers
    records = SharedStore(db).records()
    assert len(records) == 6 and {state for _, _, state, *_ in records} == {"done"}
    written = [[(r["strategy"], str(r["seed"])) for r in json.loads(
        (tmp_path / name / "results.json").read_text())["rows"]] for name in ("one", "two")]
    assert written[0] == written[1]  # the same report, rows in the command's order
    assert set(written[0]) == runs and len(written[0]) == 6
    rows = [json.loads(row) for _, _, _, row, *_ in records]
    assert {row["world_size"] for row in rows} == {1, 2}  # the data-parallel one on two
    for row in rows:  # every row searched, on whichever worker ran it
        tried = {candidate["lr"] for candidate in row["tuning"]["candidates"]}
        assert {1e-3, 1e-2} <= tried and row["tuning"]["chosen"] in tried


# -- a store no retry can fix: one line naming it, at once -----------------------------------------
def read_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every connection opens its file read-only (as a read-only mount or file would for a
    user who is not root; the tests run as root, whom file modes do not stop)."""
    connect = store.sqlite3.connect

    def reading(path: Any, *args: Any, **kwargs: Any) -> Any:
        return connect(f"file:{path}?mode=ro", *args, uri=True, **kwargs)

    monkeypatch.setattr(store.sqlite3, "connect", reading)


@pytest.mark.parametrize("kind", ["read-only", "folder", "text", "corrupt"])
def test_a_store_that_cannot_work_is_one_line_naming_it(tree, tmp_path, monkeypatch, kind):
    db = tmp_path / "s.db"
    if kind == "read-only":
        SharedStore(db)  # a real store, then opened read-only
        read_only(monkeypatch)
    elif kind == "folder":
        db.mkdir()
    elif kind == "text":
        db.write_text("strategy,seed\nlast-layer,0\n" * 40)
    else:
        SharedStore(db)
        data = bytearray(db.read_bytes())
        data[100:4096] = b"\xff" * (4096 - 100)  # the schema page, overwritten
        db.write_bytes(bytes(data))
    factory = Factory()
    with pytest.raises(SystemExit) as stopped:
        compare.main(argv(tree, tmp_path / "out", "--strategies", "last-layer", "--store",
                          str(db)), backbone_factory=factory)
    message = str(stopped.value)
    assert message.startswith(f"--store {db}") and "\n" not in message
    assert factory.calls == []  # nothing trained, nothing retried
    assert not (tmp_path / "out" / "results.json").exists()


def test_a_store_that_turns_read_only_mid_run_stops_the_worker(tree, tmp_path, monkeypatch):
    """Writable when the worker started, read-only when its run finishes: the worker stops
    with the store's line instead of retrying every run forever."""
    db = tmp_path / "s.db"
    factory = Factory()

    def then_read_only(*args: Any) -> Backbone:
        read_only(monkeypatch)
        return factory(*args)

    with pytest.raises(SystemExit, match=rf"--store {re.escape(str(db))}: attempt to write a "
                                         "readonly database"):
        compare.main(argv(tree, tmp_path / "out", "--strategies", "last-layer,bitfit",
                          "--store", str(db)), backbone_factory=then_read_only)
    assert len(factory.calls) == 1  # the second run was never started
