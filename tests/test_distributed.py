"""Data-parallel training on two CPU processes (gloo): the same results as one process with
twice the batch, identical weights on every rank, exact resume, writes by rank 0 alone.

Processes are started with torch.multiprocessing (or torchrun for the CLI) on a free port and
killed after a deadline, so a broken collective fails the test instead of hanging it."""

from __future__ import annotations

import atexit
import copy
import json
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from finetune.cache.plan import ActivationCaches
from finetune.callbacks import Checkpoint
from finetune.data import ImageFolderData, SeededShuffle
from finetune.data.preprocessing import Preprocessing
from finetune.data.sharding import ShardedSeededShuffle
from finetune.errors import CheckpointError
from finetune.model.backbone import Backbone
from finetune.runtime import distributed
from finetune.strategies import build_strategy
from finetune.train.config import TrainConfig
from finetune.train.events import Callback
from finetune.train.trainer import Trainer, epoch_seed
from finetune.tuning.advisor import advise
from finetune.tuning.search import ConfigChange, LrSearch
from tests.conftest import FAST, TINY, finish_all, make_tiny_backbone, make_tree

TIMEOUT_S = 180
CONFIG = dict(epochs=2, lr=1e-3, seed=0, precision="fp32", channels_last=False, device="cpu",
              keep_freed_memory=False)


class PlainNet(nn.Module):
    """Convolutions and a linear head without BatchNorm: per-process batch statistics cannot
    make two processes differ from one. `width` and the strides shape the stem's output (the
    cached activations of a probe)."""

    def __init__(self, width: int = 8, stem_stride: int = 2, block_stride: int = 2) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=stem_stride, padding=1),
                                  nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(width, 8, 3, stride=block_stride, padding=1),
                                   nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.block(self.stem(x))).flatten(1))


def plain_backbone(num_classes: int = 3, size: int = 24, **shape: int) -> Backbone:
    torch.manual_seed(0)
    return Backbone.from_module(PlainNet(**shape), head="fc", num_classes=num_classes,
                                name="plainnet",
                                groups=(("stem", r"^stem\."), ("block", r"^block\.")),
                                preprocessing=Preprocessing(resize_size=size, crop_size=size))


class BucketRecorder(Callback):
    """Per epoch, on every rank: how many tensors DDP reduces, and where the cache cut."""

    every_rank = True

    def __init__(self) -> None:
        self.buckets: list[int | None] = []
        self.cached: list[str | None] = []
        self.draws: list[float] = []  # a draw of torch's RNG at each epoch start
        self.shared: list[tuple[int, int]] = []  # (bytes one machine's processes share, all)

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        self.draws.append(float(torch.rand(1)))

    def on_epoch_end(self, trainer: Trainer, metrics: dict[str, float]) -> None:
        wrapper = trainer.parallel._wrapper
        self.buckets.append(None if wrapper is None else
                            wrapper._get_ddp_logging_data()["num_parameter_tensors"])
        self.cached.append(trainer.state.cached_prefix)
        self.shared.append((trainer.activations.shared_nbytes, trainer.activations.nbytes))


def fit_run(root: str, out: str, batch_size: int, model: str = "plain",
            strategy: str = "full-unfreeze", epochs: int = 2, resume: str | None = None,
            checkpoint: str | None = None, accumulate: int = 1, balanced: bool = False,
            ema: float | None = None, spill_to: str | None = None) -> dict[str, Any]:
    """One fit on the tree at `root`, as the same code on each process; what it produced."""
    backbone = plain_backbone() if model == "plain" else make_tiny_backbone(image_size=24)
    data = ImageFolderData(root, val_split=0.2, batch_size=batch_size, num_workers=0,
                           data_augmentation=False, preprocessing=backbone.preprocessing,
                           progress=False, balanced_sampling=balanced)
    recorder = BucketRecorder()
    callbacks: list[Callback] = [recorder]
    if checkpoint is not None:
        callbacks.append(Checkpoint(checkpoint, save_best=False))
    spill = {} if spill_to is None else dict(activation_cache_dir=spill_to, cache_memory_gb=0)
    config = TrainConfig(**{**CONFIG, "epochs": epochs}, accumulate_steps=accumulate,
                         ema_decay=ema, **spill)
    trainer = Trainer(backbone, build_strategy(strategy), config, callbacks)
    history = trainer.fit(data.train_loader(), data.val_loader(), resume=resume)
    report = trainer.evaluate(data.test_loader())
    return {"weights": {k: v.clone() for k, v in backbone.model.state_dict().items()},
            "history": history.records, "confusion": report.confusion_matrix.tolist(),
            "test_loss": report.loss, "buckets": recorder.buckets, "cached": recorder.cached,
            "draws": recorder.draws, "shared": recorder.shared,
            "predictions": trainer.predict(data.test_loader()).tolist()}


SEARCH_GRID = (1e-3, 1e-5, 1e-2, 1.0)  # 1e-5 stops at the peek, 1e-2 wins, 1.0 diverges
DIVERGING_LR = 1.0


class LastRankBlowsUp:
    """Cross-entropy, infinite on the last rank's second batch for the lr `DIVERGING_LR`:
    under two ranks one process's loss alone is non-finite (one process: its own)."""

    def __init__(self, lr: float) -> None:
        self.lr, self.batches = lr, 0

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        self.batches += 1
        loss = nn.functional.cross_entropy(logits, labels)
        last = distributed.rank() == distributed.world_size() - 1
        return loss * math.inf if last and self.lr == DIVERGING_LR and self.batches == 2 else loss


def search_run(root: str, out: str, batch_size: int) -> dict[str, Any]:
    """An lr search of PlainNet's full fine-tune over `SEARCH_GRID`, as the same code on each
    process: what it tried and chose, and the chosen run's weights."""
    backbone = plain_backbone()
    data = ImageFolderData(root, val_split=0.2, batch_size=batch_size, num_workers=0,
                           data_augmentation=False, preprocessing=backbone.preprocessing,
                           progress=False)

    def make_trainer(change: ConfigChange, activations: ActivationCaches) -> Trainer:
        config = change(TrainConfig(**CONFIG))
        return Trainer(copy.deepcopy(backbone), build_strategy("full-unfreeze"), config,
                       activations=activations, loss=LastRankBlowsUp(config.lr))

    tuning, trainer = LrSearch(SEARCH_GRID, epochs=2, max_extensions=0).run(
        make_trainer, data.train_loader(), data.val_loader())
    return {"chosen": tuning.chosen, "callbacks": len(trainer.callbacks),
            "candidates": [attrs.asdict(c) for c in tuning.candidates],
            "weights": {k: v.clone() for k, v in trainer.backbone.model.state_dict().items()}}


def advise_run(root: str, out: str, batch_size: int) -> dict[str, Any]:
    """`advise` of PlainNet (no BatchNorm) with budget for every fine-tune, as the same code on
    each process: each depth's measurements and the recommendation."""
    backbone = plain_backbone()
    data = ImageFolderData(root, val_split=0.2, batch_size=batch_size, num_workers=0,
                           data_augmentation=False, preprocessing=backbone.preprocessing,
                           progress=False)
    advice = advise(backbone, data, TrainConfig(**{**CONFIG, "epochs": 1}), budget=1e4)
    measured = ("name", "probe_val_accuracy", "probe_lr", "finetune_val_accuracy",
                "finetune_lr", "seconds_per_epoch")
    return {"depths": [{k: getattr(d, k) for k in measured} for d in advice.depths],
            "recommendation": attrs.asdict(advice.recommendation)}


def native_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _worker(rank: int, world: int, port: int, out: str, job: Callable[..., dict[str, Any]],
            kwargs: dict[str, Any]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    threads = native_threads()
    result = job(out=out, **kwargs)
    if job is search_run:  # as a script that never calls stop() ends: the exit hooks run
        atexit._run_exitfuncs()
    else:
        distributed.stop()
    result["threads"] = (threads, native_threads())  # before the group, after it ended
    torch.save(result, Path(out) / f"rank{rank}.pt")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def on_two_ranks(out: Path, job: Callable[..., dict[str, Any]] = fit_run, **kwargs: Any
                 ) -> list[dict[str, Any]]:
    """`job` (fit_run) on two processes under the torchrun environment; each rank's result."""
    out.mkdir(parents=True, exist_ok=True)
    context = mp.start_processes(_worker, args=(2, free_port(), str(out), job, kwargs),
                                 nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"two-process fit did not finish in {TIMEOUT_S} s")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 training, 6 validation and 9 test images (odd: a padded shard) of 3 classes."""
    return make_tree(tmp_path_factory.mktemp("ddp"), classes=3, n_train=10, n_test=3)


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def test_sharded_shuffle_deals_the_one_process_order_in_turn():
    whole = [key for key in SeededShuffle(7, seed=3)]
    shards = [list(ShardedSeededShuffle(7, seed=3, rank=r, world_size=2)) for r in range(2)]
    assert [len(s) for s in shards] == [4, 4]  # padded to a multiple of the world size
    dealt = [shards[i % 2][i // 2] for i in range(8)]
    assert dealt[:7] == whole and dealt[7] == whole[0]
    sampler = ShardedSeededShuffle(7, seed=3, rank=0, world_size=2)
    sampler.set_epoch(4)
    single = SeededShuffle(7, seed=3)
    single.set_epoch(4)
    assert list(sampler) == list(single)[::2]  # epoch-aware, as the one-process order


@pytest.fixture(scope="module")
def plain_two_ranks(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """A full fine-tune of PlainNet on two ranks with batch 2, accumulating 2 batches per
    optimizer step (DDP synchronises the second's backward only): 8 images a step."""
    return on_two_ranks(tmp_path_factory.mktemp("plain"), root=str(tree), batch_size=2,
                        accumulate=2)


@pytest.mark.distributed
def test_two_ranks_with_batch_b_match_one_process_with_batch_2b(tree, plain_two_ranks, tmp_path):
    """2 ranks × batch 2 × 2 accumulated batches = 1 process × batch 8."""
    ranks = plain_two_ranks
    single = fit_run(str(tree), str(tmp_path), batch_size=8)
    for name, tensor in ranks[0]["weights"].items():
        assert torch.equal(tensor, ranks[1]["weights"][name]), f"{name} differs across ranks"
    assert_close(ranks[0]["weights"], single["weights"])
    for key in ("train_loss", "train_accuracy", "train_images", "val_loss", "val_accuracy"):
        assert [row[key] for row in ranks[0]["history"]] == pytest.approx(
            [row[key] for row in single["history"]], rel=1e-5), key
    assert ranks[0]["history"][0]["train_images"] == 24  # all-reduced: both ranks' images
    # every test image counted once (9 over 2 ranks: one padded duplicate dropped)
    assert ranks[0]["confusion"] == ranks[1]["confusion"] == single["confusion"]
    assert sum(map(sum, single["confusion"])) == 9
    assert ranks[0]["predictions"] == single["predictions"]
    assert ranks[0]["test_loss"] == pytest.approx(single["test_loss"], rel=1e-5)
    assert ranks[0]["buckets"] == [6, 6]  # full fine-tune: all 6 tensors (2 convs, head)


@pytest.mark.distributed
def test_an_lr_search_on_two_ranks_chooses_and_trains_as_one_process(tree, tmp_path):
    """The race's peeks and epoch-end evaluations are collective, every decision is rank
    0's, a loss that is non-finite on one rank only stops both at the same batch, and the
    chosen run equals one process's with twice the batch. Afterwards no thread of the process
    group is left, though the script never called `stop` (the exit hook `start` registered
    did): a DDP wrapper kept past its fit (the search's finished runs were, through a
    reference cycle) kept the group alive into interpreter shutdown, where a gloo thread
    releasing a tensor aborted the process (docs/distributed.md)."""
    ranks = on_two_ranks(tmp_path / "two", job=search_run, root=str(tree), batch_size=2)
    single = search_run(str(tree), str(tmp_path), batch_size=4)
    assert ranks[0]["chosen"] == ranks[1]["chosen"] == single["chosen"] == 1e-2
    for rank in ranks:
        assert [{k: c[k] for k in ("value", "epochs", "steps", "diverged")}
                for c in rank["candidates"]] == [
            {k: c[k] for k in ("value", "epochs", "steps", "diverged")}
            for c in single["candidates"]]
        assert [c["val_loss"] for c in rank["candidates"]] == pytest.approx(
            [c["val_loss"] for c in single["candidates"]], rel=1e-5)
        assert_close(rank["weights"], single["weights"])
        assert rank["threads"][1] == rank["threads"][0]
    epochs = {c["value"]: (c["epochs"], c["diverged"]) for c in single["candidates"]}
    assert epochs == {1e-3: (2, False), 1e-5: (pytest.approx(1 / 3, abs=0.01), False),
                      1e-2: (2, False), 1.0: (0, True)}
    for name, tensor in ranks[0]["weights"].items():
        assert torch.equal(tensor, ranks[1]["weights"][name]), f"{name} differs across ranks"
    assert single["callbacks"] == 0  # the chosen trainer comes back without the race


@pytest.mark.distributed
def test_advise_on_two_ranks_measures_each_depth_as_one_process(tree, tmp_path):
    """The probes on the machine-shared activations, and each depth's raced fine-tune, equal
    one process's with twice the batch; every rank takes rank 0's timings, so the ranks
    fine-tune the same depths and recommend the same."""
    ranks = on_two_ranks(tmp_path / "two", job=advise_run, root=str(tree), batch_size=2)
    single = advise_run(str(tree), str(tmp_path), batch_size=4)
    assert ranks[0]["depths"] == ranks[1]["depths"]  # rank 0's seconds included
    assert ranks[0]["recommendation"] == ranks[1]["recommendation"]
    for two, one in zip(ranks[0]["depths"], single["depths"], strict=True):
        assert two["name"] == one["name"]
        for key in ("probe_val_accuracy", "probe_lr", "finetune_val_accuracy", "finetune_lr"):
            assert two[key] == pytest.approx(one[key]), (two["name"], key)
    assert [d["probe_val_accuracy"] is not None for d in single["depths"]] == [False, True, True]
    assert all(d["finetune_val_accuracy"] is not None for d in single["depths"])


@pytest.fixture(scope="module")
def balanced_two_ranks(tree: Path, tmp_path_factory: pytest.TempPathFactory
                       ) -> list[dict[str, Any]]:
    """Balanced sampling and an EMA on two ranks with batch 4; the same seed as
    `plain_two_ranks`."""
    return on_two_ranks(tmp_path_factory.mktemp("balanced"), root=str(tree), batch_size=4,
                        balanced=True, ema=0.9)


@pytest.mark.distributed
def test_each_rank_draws_its_own_random_numbers_alike_from_run_to_run(
        tree, plain_two_ranks, balanced_two_ranks, tmp_path):
    """Dropout and MixUp draw from torch's RNG: seeded from (seed, rank, epoch) under
    torchrun, so the ranks differ and every run with the seed repeats them (here two runs
    that differ only in batch, sampling and averaging, which draw nothing from it); one
    process keeps the run's own seed."""
    first, again = plain_two_ranks, balanced_two_ranks
    assert first[0]["draws"] != first[1]["draws"]
    assert [r["draws"] for r in first] == [r["draws"] for r in again]
    single = fit_run(str(tree), str(tmp_path), batch_size=8, epochs=1)
    torch.manual_seed(epoch_seed(CONFIG["seed"], 0))
    assert single["draws"] == [float(torch.rand(1))]


@pytest.mark.distributed
def test_balanced_sampling_and_an_ema_on_two_ranks_match_one_process(
        tree, balanced_two_ranks, tmp_path):
    """The weighted draws are dealt to the ranks like the shuffle (each step sees the images
    one process with twice the batch sees), and each rank's average equals that process's."""
    ranks = balanced_two_ranks
    single = fit_run(str(tree), str(tmp_path), batch_size=8, balanced=True, ema=0.9)
    assert_close(ranks[0]["weights"], single["weights"])
    assert_close(ranks[1]["weights"], single["weights"])
    assert ranks[0]["history"][0]["train_images"] == single["history"][0]["train_images"]
    plain = fit_run(str(tree), str(tmp_path), batch_size=8)
    assert any(not torch.equal(plain["weights"][k], single["weights"][k])
               for k in plain["weights"])  # sampling and averaging did change the run


@pytest.mark.distributed
def test_cached_prefix_fills_shards_and_only_trainable_tensors_enter_ddp(tree, tmp_path):
    """Last layer of a BatchNorm net (frozen BN in eval mode): the prefix's activations are
    cached from each rank's rows, the head alone is in DDP's buckets, and the result is one
    process's with twice the batch."""
    ranks = on_two_ranks(tmp_path, root=str(tree), batch_size=4, model="tiny",
                         strategy="last-layer")
    single = fit_run(str(tree), str(tmp_path), batch_size=8, model="tiny",
                     strategy="last-layer")
    assert ranks[0]["cached"] == ranks[1]["cached"] == single["cached"] != [None, None]
    assert ranks[0]["buckets"] == ranks[1]["buckets"] == [2, 2]  # fc weight and bias
    assert_close(ranks[1]["weights"], single["weights"])
    assert ranks[0]["confusion"] == single["confusion"]
    # one host: the two processes kept one copy in shared memory; one process has no peer
    assert all(shared == total > 0 for shared, total in ranks[0]["shared"] + ranks[1]["shared"])
    assert all(shared == 0 < total for shared, total in single["shared"])


@pytest.mark.distributed
def test_a_spilled_cache_is_one_file_both_ranks_map(tree, tmp_path):
    """Over the memory budget the activations go to one keyed file on disk: the two
    processes write their own rows into it and train as one process does."""
    spill = str(tmp_path / "spill")
    ranks = on_two_ranks(tmp_path / "two", root=str(tree), batch_size=4, model="tiny",
                         strategy="last-layer", spill_to=spill)
    single = fit_run(str(tree), str(tmp_path / "one"), batch_size=8, model="tiny",
                     strategy="last-layer", spill_to=str(tmp_path / "spill_one"))
    assert len(list(Path(spill).glob("*.bin"))) == 2  # train and val, one file each
    assert all(shared == total > 0 for shared, total in ranks[0]["shared"] + ranks[1]["shared"])
    assert_close(ranks[0]["weights"], single["weights"])
    assert ranks[1]["confusion"] == single["confusion"]


def wide_backbone(num_classes: int = 3) -> Backbone:
    """A wide full-resolution stem: its cached output is ~0.5 MB an image at 64 px, far more
    than what training the rest holds, so a copy of it is plain to see."""
    return plain_backbone(num_classes, size=64, width=32, stem_stride=1, block_stride=4)


@pytest.mark.distributed
def test_a_second_local_process_adds_little_of_the_cache_to_the_machine(tmp_path: Path):
    """benchmarks.cache_memory's measurement, one process and then two under torchrun: the
    processes' summed PSS growth (what they cost the machine, shared pages split between
    them) shows the cache once, and the second process adds under 30% of its size."""
    from benchmarks.cache_memory import run_processes, summary

    data = make_tree(tmp_path / "data", classes=3, n_train=40, n_test=1)
    options = ["--data", str(data), "--backbone", "tests.test_distributed:wide_backbone",
               "--strategy", "freeze-all-but:groups=block", "--image-size", "64",
               "--batch-size", "16"]
    one = summary(run_processes(1, options, tmp_path / "one", timeout=TIMEOUT_S))
    ranks = run_processes(2, options, tmp_path / "two", timeout=TIMEOUT_S)
    two, cache = summary(ranks), one["cache_bytes"]
    assert cache == two["cache_bytes"] > 40 * 2**20  # 3 x 40 images x 0.5 MB
    assert (one["shared_bytes"], two["shared_bytes"]) == (0, cache)
    assert one["machine_added"] > 0.7 * cache  # the measurement does see the cache
    assert two["machine_added"] - one["machine_added"] < 0.3 * cache
    assert ranks[0]["weights"] == ranks[1]["weights"]


@pytest.mark.distributed
def test_gradual_unfreezing_rebuilds_ddp_with_what_trains(tree: Path, tmp_path: Path):
    ranks = on_two_ranks(tmp_path, root=str(tree), batch_size=4,
                         strategy="gradual-unfreeze")
    assert ranks[0]["buckets"] == ranks[1]["buckets"]
    assert ranks[0]["buckets"][0] < ranks[0]["buckets"][-1]  # more tensors once unfrozen
    for name, tensor in ranks[0]["weights"].items():
        assert torch.equal(tensor, ranks[1]["weights"][name]), name


@pytest.mark.distributed
def test_resume_on_two_ranks_equals_a_straight_run_and_another_world_size_is_refused(
        tree: Path, plain_two_ranks: list[dict[str, Any]], tmp_path: Path):
    run = tmp_path / "run"
    on_two_ranks(tmp_path / "first", root=str(tree), batch_size=2, accumulate=2, epochs=1,
                 checkpoint=str(run))
    assert torch.load(run / "last.pt", weights_only=True)["world_size"] == 2
    resumed = on_two_ranks(tmp_path / "second", root=str(tree), batch_size=2, accumulate=2,
                           resume=str(run / "last.pt"))
    assert_close(resumed[1]["weights"], plain_two_ranks[1]["weights"])
    assert [row["train_loss"] for row in resumed[0]["history"]] == pytest.approx(
        [row["train_loss"] for row in plain_two_ranks[0]["history"]], rel=1e-5)
    with pytest.raises(CheckpointError, match=r"trained by 2 processes and this run has 1"):
        fit_run(str(tree), str(tmp_path), batch_size=8, resume=str(run / "last.pt"))


@pytest.mark.distributed
def test_cli_under_torchrun_trains_and_rank_zero_alone_writes(tree: Path, tmp_path: Path):
    """`--lr auto` included (a cached linear probe's search): rank 0 alone prints the
    search and records it, and the run trains at the lr it chose."""
    run = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "finetune", "train", "--data", str(tree),
               "--backbone", TINY, "--strategy", "last-layer", "--epochs", "2",
               "--batch-size", "4", "--lr", "auto", "--lr-grid", "1e-3,1e-1",
               "--checkpoint-dir", str(run), *FAST]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("test set (weights after the last epoch)") == 1
    assert done.stdout.count("data: 3 classes") == 1
    assert done.stdout.count("--lr auto: trying 0.001, 0.1") == 1
    record = json.loads((run / "run.json").read_text())
    assert record["world_size"] == 2
    assert {1e-3, 1e-1} <= {c["lr"] for c in record["tuning"]["candidates"]}
    assert torch.load(run / "last.pt", weights_only=True)["config"]["lr"] == (
        record["tuning"]["chosen"])
    assert sorted(p.name for p in run.iterdir()) == ["MODEL_CARD.md", "best.pt", "last.pt",
                                                    "run.json"]
    assert torch.load(run / "last.pt", weights_only=True)["world_size"] == 2
    # evaluate under torchrun: each rank its share, every test image counted once, one report
    evaluate = ["evaluate", "--checkpoint", str(run), "--backbone", TINY, *FAST]
    launched = [*command[:command.index("train")], *evaluate, "--json", str(tmp_path / "two.json")]
    done = subprocess.run(launched, capture_output=True, text=True, timeout=TIMEOUT_S,
                          env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("on the test set of") == 1
    alone = subprocess.run([sys.executable, "-m", "finetune", *evaluate, "--json",
                            str(tmp_path / "one.json")],
                           capture_output=True, text=True, timeout=TIMEOUT_S, env=env,
                           cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr[-3000:]
    two, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    assert sum(map(sum, two["confusion_matrix"])) == 9  # 9 test images, none twice
    assert two["confusion_matrix"] == one["confusion_matrix"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)


def on_two_nodes(argv: list[str], cwd: Path, per_node: int = 1
                 ) -> list[subprocess.CompletedProcess]:
    """`finetune ARGV` under two torchrun launchers of `per_node` processes each, as on two
    machines: `--nnodes 2 --node-rank 0|1`, c10d rendezvous on 127.0.0.1; both must finish."""
    port, env = free_port(), {**os.environ, "OMP_NUM_THREADS": "1",
                              "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    launchers = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank",
         str(node), "--nproc-per-node", str(per_node), "--rdzv-backend", "c10d",
         "--rdzv-endpoint",
         f"127.0.0.1:{port}", "--rdzv-id", f"nodes{port}", "-m", "finetune", *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
        for node in (0, 1)]
    return finish_all(launchers, TIMEOUT_S, f"two-node {argv[0]}")


@pytest.mark.distributed
def test_two_nodes_train_resume_and_evaluate_as_one_process(tree: Path, tmp_path: Path):
    """Two launchers on one host stand for two machines: a run trained one epoch, resumed
    for a second and evaluated there equals one process with twice the batch; one process
    of the two writes, and run.json says two nodes."""
    train = ["train", "--data", str(tree), "--backbone", TINY, "--strategy", "last-layer",
             "--batch-size", "4", *FAST]
    run, alone = tmp_path / "nodes", tmp_path / "alone"
    on_two_nodes([*train, "--epochs", "1", "--checkpoint-dir", str(run)], tmp_path)
    record = json.loads((run / "run.json").read_text())
    assert (record["world_size"], record["nodes"]) == (2, 2)
    resumed = on_two_nodes([*train, "--epochs", "2", "--resume", str(run)], tmp_path)
    assert sum(p.stdout.count("test set (weights after the last epoch)") for p in resumed) == 1
    evaluate = ["evaluate", "--checkpoint", str(run / "last.pt"), "--backbone", TINY, *FAST]
    on_two_nodes([*evaluate, "--json", str(tmp_path / "nodes.json")], tmp_path)

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    one = [*train[:train.index("--batch-size")], "--batch-size", "8", *FAST, "--epochs", "2",
           "--checkpoint-dir", str(alone)]
    for argv in (one, [*evaluate[:2], str(alone / "last.pt"), *evaluate[3:], "--json",
                       str(tmp_path / "alone.json")]):
        done = subprocess.run([sys.executable, "-m", "finetune", *argv], capture_output=True,
                              text=True, timeout=TIMEOUT_S, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    ours, theirs = (torch.load(p / "last.pt", weights_only=True) for p in (run, alone))
    assert int(ours["epoch"]) == int(theirs["epoch"]) == 1
    assert_close(ours["model"], theirs["model"])
    nodes, single = (json.loads((tmp_path / f"{n}.json").read_text())
                     for n in ("nodes", "alone"))
    assert nodes["confusion_matrix"] == single["confusion_matrix"]
    assert sum(map(sum, nodes["confusion_matrix"])) == 9

    # two machines of two processes each: each machine's pair shares one cache, and rows
    # travel only between the machines; still one process's run with the global batch
    four = tmp_path / "four"
    on_two_nodes([*train[:train.index("--batch-size")], "--batch-size", "2", *FAST,
                  "--epochs", "2", "--checkpoint-dir", str(four)], tmp_path, per_node=2)
    assert json.loads((four / "run.json").read_text())["world_size"] == 4
    assert_close(torch.load(four / "last.pt", weights_only=True)["model"], theirs["model"])


def test_compare_nproc_starts_the_same_command_under_torchrun(monkeypatch, capsys):
    from finetune.compare import run

    started: list[list[str]] = []
    monkeypatch.setattr(run.subprocess, "call", lambda command: started.append(command) or 0)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["--strategies", "last-layer", "--nproc", "2", "--epochs", "1", "--output", "x",
            "--tune", "none"]
    assert run.main(argv) == 0
    assert started == [[sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", "-m", "finetune", "compare", "--strategies",
                        "last-layer", "--epochs", "1", "--output", "x", "--tune", "none"]]
    assert run.main(argv[:-2]) == 0  # the quick preset's lr search runs under torchrun too
    assert started[1][-1] == "x" and "--tune" not in started[1]
    with pytest.raises(SystemExit):
        run.main([*argv[:-1], "lr-find"])
    assert "--tune lr-find: the range test trains in one process" in capsys.readouterr().err
    assert len(started) == 2  # refused before torchrun started anything


@pytest.fixture
def as_rank_one_of_two(monkeypatch: pytest.MonkeyPatch) -> None:
    """shard_loader as rank 1 of 2 sees it, without a process group."""
    monkeypatch.setattr(distributed, "active", lambda: True)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)


def test_shard_loader_deals_each_kind_of_loader_or_says_what_it_needs(as_rank_one_of_two):
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from finetune.errors import DataError

    dataset = TensorDataset(torch.arange(10.0), torch.zeros(10, dtype=torch.long))
    shuffled = distributed.shard_loader(DataLoader(dataset, batch_size=4, shuffle=True), seed=5)
    assert isinstance(shuffled.sampler, DistributedSampler)
    assert (shuffled.sampler.shuffle, shuffled.sampler.seed, shuffled.sampler.rank) == (True, 5, 1)
    ordered = distributed.shard_loader(DataLoader(dataset, batch_size=4))
    assert [int(x) for batch, _ in ordered for x in batch] == [1, 3, 5, 7, 9]
    assert distributed.shard_loader(ordered) is ordered  # already dealt: used as given
    plain = DataLoader(dataset, batch_size=4)  # one share per loader, for a cache to know it
    assert distributed.shard_loader(plain) is distributed.shard_loader(plain, seed=3)
    randomly = DataLoader(dataset, batch_size=4, shuffle=True)
    assert distributed.shard_loader(randomly, seed=5) is distributed.shard_loader(randomly, 5)
    assert distributed.shard_loader(randomly, seed=6).sampler.seed == 6  # another order
    seeded = DataLoader(dataset, batch_size=2, sampler=SeededShuffle(10, seed=1))
    shard = distributed.shard_loader(seeded).sampler
    assert isinstance(shard, ShardedSeededShuffle) and len(shard) == 5
    assert distributed.shard_loader(seeded).drop_last  # 5 % 2 == 1: no BatchNorm batch of 1
    with pytest.raises(DataError, match="DistributedSampler yourself"):
        distributed.shard_loader([(torch.zeros(2, 3), torch.zeros(2))])


