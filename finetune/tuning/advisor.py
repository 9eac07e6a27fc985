"""Which layers to freeze, and what each choice costs: `advise(backbone, data)`.

A depth is where freezing stops: "freeze through layer3" freezes the stem and layer1–layer3
and trains layer4 and the head (`freeze-all-but:groups=layer4`); the deepest freezes all but
the head (`last-layer`); "none" freezes nothing (`full-unfreeze`). For every depth:

1. **One pass.** The head-alone depth trains first (its lr raced as `finetune.tuning.search` races
   any lr). Its first fit runs the frozen backbone over train and val once and keeps the
   activations at every group boundary (`ActivationCaches(keep=...)`: the fx cut training
   uses, at several points of one forward; each bit-identical to that point's own cut).
2. **Frozen features.** A linear probe on each depth's pooled activations, lr chosen on val,
   with a 95% bootstrap interval of its val accuracy.
3. **Cost.** A few real optimizer steps of the depth's strategy, timed — on the stored
   activations, so the frozen part is not run again, as its training would run — scaled to
   one epoch's training pass; peak memory above the start of those steps; trainable params.
4. **Short fine-tunes** from the promising depths — the best probe's and those next to it —
   cheapest first while the budget lasts, each an lr race on the stored activations.

**What the recommendation rests on.** Fine-tuned validation accuracy, not the probe: a probe
scores a depth's frozen features as they are, and so underrates a depth whose later layers
should adapt (which is the point of training them); it only decides where to fine-tune.
Among the depths fine-tuned, the cheapest per epoch whose accuracy is within one standard
error of the best (the paired difference on the same validation images) is recommended —
the one-standard-error rule of Breiman et al. (1984): prefer the cheaper model that the data
cannot tell from the best. The test set is never read.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

from finetune.atomic import atomic_write, atomic_write_json, atomic_write_text
from finetune.cache.cut import CutPoint, multi_prefix
from finetune.cache.plan import ActivationCaches
from finetune.cache.store import Cut
from finetune.model.backbone import Backbone
from finetune.runtime import distributed
from finetune.runtime.memory import PeakMemory
from finetune.runtime.precision import machine
from finetune.stats.significance import Bootstrap
from finetune.strategies import FreezeAllBut, FreezeStrategy, FullUnfreeze, LastLayerOnly
from finetune.train.config import TrainConfig
from finetune.train.events import Callback, StopFit
from finetune.train.trainer import Trainer
from finetune.tuning.search import PEEK, ConfigChange, LrSearch, ahead, search_grid

ADVICE_FORMAT = 1
NOTHING_FROZEN = "none"
BUDGET_EPOCHS = 1.0  # default fine-tune budget: this many epochs of full fine-tuning
PROBE_LRS = (1e-3, 1e-2, 1e-1)
PROBE_STEPS = 100
TIMED_STEPS = 1  # timed optimizer steps per depth, after WARMUP untimed ones: a depth's
WARMUP = 1  # first step is 40-70% slower (allocations, first calls), measured on Lite0
FEW_VAL_IMAGES = 50  # below this the recommendation says how rough it is


@attrs.define
class Depth:
    """One place to stop freezing, and what the advisor measured there (None: not run)."""

    name: str  # the last frozen group, or "none"
    strategy: str  # the spec `finetune train --strategy` takes
    cut: str | None  # where its stored activations are cut (None: nothing frozen)
    trainable_params: int
    seconds_per_epoch: float | None = None  # the training pass, from timed steps
    peak_memory_mb: float | None = None
    probe_val_accuracy: float | None = None
    probe_val_ci95: list[float] | None = None
    probe_lr: float | None = None
    finetune_val_accuracy: float | None = None
    finetune_lr: float | None = None
    finetune_seconds: float | None = None
    note: str = ""  # why a measurement is missing
    val_correct: np.ndarray | None = attrs.field(default=None, repr=False, eq=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in attrs.asdict(self).items() if k != "val_correct"}


@attrs.frozen
class Recommendation:
    """The depth advised, as the spec `finetune train --strategy` takes, the lr its fine-tune
    chose, the command that trains it, and why, in words."""

    depth: str
    strategy: str
    lr: float
    command: str
    reason: str


@attrs.frozen
class Advice:
    """What `advise` measured per depth, and the depth it recommends."""

    depths: tuple[Depth, ...]
    recommendation: Recommendation
    seconds: float
    budget_seconds: float
    settings: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"format": ADVICE_FORMAT, "depths": [d.to_dict() for d in self.depths],
                "recommendation": attrs.asdict(self.recommendation),
                "seconds": self.seconds, "budget_seconds": self.budget_seconds,
                "settings": self.settings}

    def table(self) -> str:
        """The depths as a Markdown table, shallow to deep."""
        def pct(value: float | None) -> str:
            return "–" if value is None else f"{100 * value:.1f}"

        lines = ["| freeze through | trainable params | probe val % [95% CI] | fine-tuned val % "
                 "(lr) | s/epoch | peak MiB |", "|---|---|---|---|---|---|"]
        for d in self.depths:
            probe = pct(d.probe_val_accuracy)
            if d.probe_val_ci95 is not None:
                probe += f" [{pct(d.probe_val_ci95[0])}, {pct(d.probe_val_ci95[1])}]"
            tuned = pct(d.finetune_val_accuracy)
            if d.finetune_lr is not None:
                tuned += f" ({d.finetune_lr:g})"
            mark = "**" if d.name == self.recommendation.depth else ""
            lines.append(f"| {mark}{d.name}{mark} | {d.trainable_params:,} | {probe} | {tuned} | "
                         f"{_number(d.seconds_per_epoch)} | {_number(d.peak_memory_mb, 0)} |")
        return "\n".join(lines)

    def summary(self) -> str:
        r = self.recommendation
        return (f"{self.table()}\n\nRecommendation: {r.reason}\n  {r.command}\n"
                f"(advise took {self.seconds:.0f} s on {self.settings['machine']['cpu']})")

    def write(self, folder: str | Path) -> list[Path]:
        """advise.json, advise.md and (with matplotlib) frontier.png in `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        written = [folder / "advise.json", folder / "advise.md"]
        atomic_write_json(written[0], self.to_dict())
        atomic_write_text(written[1], f"# Where to stop freezing\n\n{self.summary()}\n")
        frontier = plot_frontier(self, folder / "frontier.png")
        return written + ([frontier] if frontier is not None else [])


def _number(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "–"
    return f"{value:.{digits}g}" if digits else f"{value:.0f}"


# -- the depths ---------------------------------------------------------------------------------
def depth_strategies(backbone: Backbone) -> list[tuple[str, FreezeStrategy, str]]:
    """(name, strategy, spec) for freezing nothing, then through each group in turn; the
    last freezes all but the head."""
    groups = [name for name in backbone.group_names if name != "head"]
    out: list[tuple[str, FreezeStrategy, str]] = [(NOTHING_FROZEN, FullUnfreeze(),
                                                   "full-unfreeze")]
    for index, group in enumerate(groups):
        after = tuple(groups[index + 1:])
        if after:
            out.append((group, FreezeAllBut(groups=after),
                        f"freeze-all-but:groups={'+'.join(after)}"))
        else:
            out.append((group, LastLayerOnly(), "last-layer"))
    return out


def _cut(backbone: Backbone, strategy: FreezeStrategy, caches: ActivationCaches
         ) -> tuple[Cut | None, int]:
    """Where `strategy` cuts the backbone (traced once for every copy), and how many
    parameters it trains."""
    report = strategy.apply(backbone)
    return caches.cut_for(backbone), report.trainable_params


def check_memory(backbone: Backbone, cut: Cut, points: Sequence[CutPoint], loaders: Sequence[Any],
                 config: TrainConfig) -> None:
    """Refuse, before the pass, to keep more activations than `config.cache_memory_gb` holds
    (unless they may spill to `activation_cache_dir`): every depth's are kept at once."""
    points = [point for point in points if point in cut.graph.traces.points]
    if config.activation_cache_dir is not None or not points:
        return
    sample = loaders[0].dataset[0][0].unsqueeze(0)
    backbone.eval()
    with torch.no_grad():
        outputs = multi_prefix(backbone.model, cut.graph.traces, points)(sample)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    per_image = sum(out.numel() * 4 for out in outputs)  # fp32: the most they take
    images = sum(len(loader.dataset) for loader in loaders)
    needed, budget = per_image * images, config.cache_memory_gb * 2**30
    if needed > budget:
        raise MemoryError(
            f"advise keeps the activations of {images:,} images at {len(points)} depths: about "
            f"{needed / 2**30:.2g} GiB, over the {config.cache_memory_gb:g} GiB cache budget. "
            "Advise on fewer images (--train-per-class 100: the advice needs a sample, not "
            "all of them) or a smaller --image-size; in Python, raise "
            "TrainConfig.cache_memory_gb or give activation_cache_dir to spill to disk.")


# -- probes -------------------------------------------------------------------------------------
def pooled(activations: torch.Tensor) -> torch.Tensor:
    """One vector per image: the spatial mean of a feature map (N, C, H, W), the token mean of
    a sequence (N, L, C), or the activation itself (N, C)."""
    x = activations.float()
    if x.dim() == 4:
        return x.mean(dim=(2, 3))
    if x.dim() == 3:
        return x.mean(dim=1)
    return x.flatten(1)


def linear_probe(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                 num_classes: int, lrs: Sequence[float] = PROBE_LRS,
                 steps: int = PROBE_STEPS) -> tuple[float, np.ndarray, float]:
    """(val accuracy, val predictions, the lr chosen on val) of a linear classifier trained on
    standardised pooled features: full-batch Adam from zero weights, so no random state."""
    x, y = pooled(train[0]), train[1].long().clone()  # stored in inference mode: copies
    vx, vy = pooled(val[0]), val[1].long().clone()  # that autograd may save
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    x, vx = (x - mean) / std, (vx - mean) / std
    if not lrs:
        raise ValueError("linear_probe needs at least one lr")
    # one classifier per lr, trained side by side: their losses are summed, so each gets
    # exactly its own gradient, and Adam's per-group lr keeps them apart
    weights = [torch.zeros(x.shape[1], num_classes, requires_grad=True) for _ in lrs]
    biases = [torch.zeros(num_classes, requires_grad=True) for _ in lrs]
    optimizer = torch.optim.Adam([{"params": [w, b], "lr": lr}
                                  for w, b, lr in zip(weights, biases, lrs, strict=True)])
    with torch.enable_grad():
        for _ in range(steps):
            loss = sum(torch.nn.functional.cross_entropy(x @ w + b, y)
                       for w, b in zip(weights, biases, strict=True))
            optimizer.zero_grad()
            loss.backward()  # type: ignore[union-attr]
            optimizer.step()
    results = []
    with torch.no_grad():
        for weight, bias, lr in zip(weights, biases, lrs, strict=True):
            logits = vx @ weight + bias
            results.append(((float((logits.argmax(1) == vy).float().mean()),
                             float(torch.nn.functional.cross_entropy(logits, vy))),
                            logits.argmax(1).numpy(), lr))
    best = results[0]
    for result in results[1:]:
        if ahead(result[0], best[0]):
            best = result
    return best[0][0], best[1], best[2]


# -- timing ---------------------------------------------------------------------------------------
class StepsTimed(StopFit):
    """The timed steps are done: the fit ends there."""


class StepClock(Callback):
    """Times optimizer steps after `warmup` untimed ones, and ends the fit after `steps`
    (on every rank at the same step: each process counts its own)."""

    every_rank = True

    def __init__(self, steps: int = TIMED_STEPS, warmup: int = 1) -> None:
        self.steps, self.warmup = steps, warmup
        self.times: list[float] = []

    def on_fit_start(self, trainer: Any) -> None:
        self.times = [time.perf_counter()]

    def on_optimizer_step(self, trainer: Any, step: int) -> None:
        self.times.append(time.perf_counter())
        if len(self.times) > self.warmup + self.steps:
            raise StepsTimed(f"{self.steps} steps timed")

    @property
    def seconds_per_step(self) -> float | None:
        steps = np.diff(self.times)  # all of them when the fit ended before the warm-up did
        timed = steps[self.warmup:] if len(steps) > self.warmup else steps
        return float(timed.mean()) if len(timed) else None


# -- the advisor --------------------------------------------------------------------------------
class Advisor:
    """Measures every depth and recommends one; see the module docstring for how.

    `config` is the training the advice is for (its lr is tried first, its epochs are the
    fine-tunes' length and go in the recommended command); `finetune_epochs`: a shorter
    fine-tune; `lr_grid`: the lrs each fine-tune races (default: the lr and its neighbours);
    `budget`: seconds for the fine-tunes besides the head alone's (None: `BUDGET_EPOCHS`
    epochs of full fine-tuning, as measured); `max_finetunes`: depths fine-tuned besides the
    head alone; `train_command`: the command the recommendation extends.
    """

    def __init__(self, config: TrainConfig | None = None, *, finetune_epochs: int | None = None,
                 budget: float | None = None, lr_grid: Sequence[float] | None = None,
                 max_finetunes: int = 3, timed_steps: int = TIMED_STEPS,
                 train_command: str = "finetune train") -> None:
        self.config = config or TrainConfig()
        finetune_epochs = finetune_epochs or self.config.epochs
        if finetune_epochs < 1 or max_finetunes < 0 or timed_steps < 1:
            raise ValueError("finetune_epochs and timed_steps must be >= 1, max_finetunes >= 0")
        if budget is not None and not (math.isfinite(budget) and budget >= 0):
            raise ValueError(f"the budget is seconds >= 0, got {budget}")
        self.finetune_epochs, self.budget = finetune_epochs, budget
        self.grid = search_grid(self.config.lr, lr_grid)
        self.max_finetunes, self.timed_steps = max_finetunes, timed_steps
        self.train_command = train_command

    def run(self, backbone: Backbone, train_loader: Iterable[Any],
            val_loader: Iterable[Any] | None) -> Advice:
        if val_loader is None:
            raise ValueError("advice is measured on validation data: give a val loader "
                             "(e.g. --val-split 0.2)")
        started = time.perf_counter()
        initial = copy.deepcopy(backbone)
        plans = depth_strategies(initial)
        depths, strategies, points = [], {}, {}
        cut: Cut | None = None
        shared = ActivationCaches(copies=True)  # every fit trains a copy of `initial`
        for name, strategy, spec in plans:
            cut, trainable = _cut(initial, strategy, shared)
            point = cut.point if cut is not None else None
            depths.append(Depth(name, spec, point.label if point else None, trainable))
            strategies[name], points[name] = strategy, point
        kept = [p for p in points.values() if p is not None]
        if cut is not None:  # the head alone's cut: every other point lies before it
            check_memory(initial, cut, kept, [train_loader, val_loader], self.config)
        shared.keep = tuple(kept)
        run = _Run(self, initial, strategies, shared, train_loader, val_loader)
        phases: dict[str, float] = {}
        clock = time.perf_counter()

        def phase(name: str) -> None:
            nonlocal clock
            phases[name] = time.perf_counter() - clock
            clock = time.perf_counter()

        try:
            run.time(depths[0])  # full fine-tuning: its precision and layout go for all depths
            phase("full_fine_tuning_steps")
            run.finetune(depths[-1])  # the one pass, and the head-alone fine-tune
            phase("pass_and_head_alone")
            for depth in depths:
                run.probe(depth, points[depth.name])
            phase("probes")
            for depth in depths[1:]:
                run.time(depth)
            phase("timed_steps")
            budget = self.budget if self.budget is not None else (
                BUDGET_EPOCHS * (depths[0].seconds_per_epoch or 0.0))
            spent = 0.0
            for depth in self._promising(depths):
                needed = (depth.seconds_per_epoch or 0.0) * (self.finetune_epochs + 2 * PEEK)
                if spent + needed > budget:
                    depth.note = (f"not fine-tuned: needs about {needed:.2g} s, "
                                  f"{budget - spent:.2g} s of the budget left (--budget)")
                    continue
                spent += run.finetune(depth)
            phase("finetunes")
        finally:
            shared.release()
        recommendation = self._recommend(depths)
        settings = {"machine": {**machine(), "device": str(run.device)},
                    "precision": run.precision, "channels_last": run.channels_last,
                    "finetune_epochs": self.finetune_epochs, "epochs": self.config.epochs,
                    "lr_grid": list(self.grid), "seed": self.config.seed,
                    "train_images": _dataset_size(train_loader),
                    "val_images": _dataset_size(val_loader), "phase_seconds": phases}
        return Advice(tuple(depths), recommendation, time.perf_counter() - started, budget,
                      settings)

    def _promising(self, depths: list[Depth]) -> list[Depth]:
        """Depths to fine-tune, cheapest first: those nearest the best probe (ties: the
        deeper), the head alone excepted (it is always fine-tuned)."""
        probed = [i for i, d in enumerate(depths) if d.probe_val_accuracy is not None]
        if not probed:
            return []
        best = max(probed, key=lambda i: (depths[i].probe_val_accuracy, i))
        nearest = sorted(range(len(depths) - 1), key=lambda i: (abs(i - best), -i))
        chosen = [depths[i] for i in nearest[: self.max_finetunes]
                  if depths[i].finetune_val_accuracy is None]
        return sorted(chosen, key=lambda d: d.seconds_per_epoch or math.inf)

    def _recommend(self, depths: list[Depth]) -> Recommendation:
        tuned = [d for d in depths if d.finetune_val_accuracy is not None]
        best = max(tuned, key=lambda d: (d.finetune_val_accuracy, -(d.seconds_per_epoch or 0)))
        chosen, error = best, 0.0
        for depth in sorted(tuned, key=lambda d: d.seconds_per_epoch or math.inf):
            error = paired_standard_error(best.val_correct, depth.val_correct)
            if best.finetune_val_accuracy - depth.finetune_val_accuracy <= error + 1e-12:
                chosen = depth
                break
        full = next(d for d in depths if d.name == NOTHING_FROZEN)
        reason = _reason(chosen, best, error, full, self.finetune_epochs)
        images = len(best.val_correct) if best.val_correct is not None else 0
        if images < FEW_VAL_IMAGES:
            reason += (f". Caution: {images} validation images, so one image moves accuracy "
                       f"by {100 / max(images, 1):.2g} points and depths can hardly be told "
                       "apart; hold out more (--val-split, --train-per-class)")
        lr = chosen.finetune_lr if chosen.finetune_lr is not None else self.config.lr
        command = (f"{self.train_command} --strategy {chosen.strategy} --lr {lr:g} "
                   f"--epochs {self.config.epochs}")
        return Recommendation(chosen.name, chosen.strategy, lr, command, reason)


def paired_standard_error(a: np.ndarray | None, b: np.ndarray | None) -> float:
    """Standard error of the accuracy difference of two models on the same images."""
    if a is None or b is None or len(a) < 2:
        return 0.0
    difference = a.astype(float) - b.astype(float)
    return float(difference.std(ddof=1) / math.sqrt(len(difference)))


def _reason(chosen: Depth, best: Depth, error: float, full: Depth, epochs: int) -> str:
    what = ("fine-tune everything" if chosen.name == NOTHING_FROZEN
            else f"freeze through {chosen.name}")
    accuracy = f"{100 * (chosen.finetune_val_accuracy or 0):.1f}%"
    if chosen is best:
        standing = f"the best validation accuracy of the depths fine-tuned ({accuracy})"
    else:
        standing = (f"validation {accuracy}, within one standard error ({100 * error:.1f} "
                    f"points) of the best ({best.name}, "
                    f"{100 * (best.finetune_val_accuracy or 0):.1f}%)")
    cost = ""
    if chosen is not full and chosen.seconds_per_epoch and full.seconds_per_epoch:
        ratio = full.seconds_per_epoch / chosen.seconds_per_epoch
        share = f"1/{ratio:.0f}" if ratio >= 1.5 else f"{100 / ratio:.0f}%"
        cost = (f", at {share} of full fine-tuning's cost per epoch "
                f"({chosen.seconds_per_epoch:.2g} s vs {full.seconds_per_epoch:.2g} s)")
    return (f"{what}: {standing} after {epochs} epoch{'s' * (epochs != 1)} of fine-tuning"
            f"{cost}")


def _dataset_size(loader: Any) -> int | None:
    dataset = getattr(loader, "dataset", None)
    return len(dataset) if dataset is not None else None


class _Run:
    """One advise run's shared state: the pristine backbone, the multi-cut cache, and the
    precision the first fit chose (pinned for the others, so they share its activations)."""

    def __init__(self, advisor: Advisor, initial: Backbone,
                 strategies: dict[str, FreezeStrategy], shared: ActivationCaches,
                 train_loader: Iterable[Any], val_loader: Iterable[Any]) -> None:
        self.advisor, self.initial, self.strategies = advisor, initial, strategies
        self.shared, self.train_loader, self.val_loader = shared, train_loader, val_loader
        self.precision: str | None = None
        self.channels_last: bool | None = None
        self.device = torch.device("cpu")

    def trainer(self, depth: Depth, epochs: int, callbacks: Sequence[Callback] = (),
                change: ConfigChange | None = None) -> Trainer:
        """`depth`'s trainer at the advice's config for `epochs` (`change`: a search's
        candidate)."""
        config = attrs.evolve(self.advisor.config, epochs=epochs)
        if change is not None:
            config = change(config)
        if self.precision is not None:  # one precision and layout: the stored activations'
            config = attrs.evolve(config, precision=self.precision,
                                  channels_last=self.channels_last)
        return Trainer(copy.deepcopy(self.initial), copy.deepcopy(self.strategies[depth.name]),
                       config, list(callbacks),
                       activations=self.shared if depth.cut is not None else None)

    def finetune(self, depth: Depth) -> float:
        """An lr race of short fine-tunes from `depth`; returns its seconds."""
        def make(change: ConfigChange, _: ActivationCaches) -> Trainer:
            return self.trainer(depth, self.advisor.finetune_epochs, change=change)

        search = LrSearch(self.advisor.grid, self.advisor.finetune_epochs)
        tuning, trainer = search.run(make, self.train_loader, self.val_loader,
                                     activations=self.shared if depth.cut else None)
        report = trainer.state.val_report
        if report is None or report.predictions is None or report.targets is None:
            raise RuntimeError("a fine-tune's last validation kept no predictions")
        depth.finetune_val_accuracy = float(report.accuracy)
        depth.finetune_lr = tuning.chosen
        depth.finetune_seconds = distributed.same_as_main(tuning.seconds)  # spends the budget
        depth.val_correct = report.predictions == report.targets
        return depth.finetune_seconds

    def probe(self, depth: Depth, point: CutPoint | None) -> None:
        if point is None:
            depth.note = ("nothing frozen: no features to probe" if depth.name == NOTHING_FROZEN
                          else "no cut where one activation crosses: trained uncached, "
                          "not probed")
            return
        try:  # held under the loaders fit trained on: under torchrun, this process's shares
            train = self.shared.stored(point, distributed.shard_loader(
                self.train_loader, self.advisor.config.seed))
            val = self.shared.stored(point, distributed.shard_loader(self.val_loader))
        except KeyError:
            depth.note = "its activations were not stored in the pass (not a cut point there)"
            return
        # rank 0 probes (every process holds every row); which depths are fine-tuned is
        # decided from its result, so every process takes it
        measured = self._probed(train, val) if distributed.is_main() else None
        depth.probe_val_accuracy, depth.probe_val_ci95, depth.probe_lr = (
            distributed.same_as_main(measured))

    def _probed(self, train: tuple[torch.Tensor, torch.Tensor],
                val: tuple[torch.Tensor, torch.Tensor]) -> tuple[float, list[float], float]:
        """(val accuracy, its 95% interval, the lr) of a linear probe on stored features."""
        accuracy, predictions, lr = linear_probe(train, val, self.initial.num_classes)
        estimate = Bootstrap(targets=val[1].numpy(), num_classes=self.initial.num_classes
                             ).accuracy(predictions)
        return accuracy, estimate.interval, lr

    def time(self, depth: Depth) -> None:
        """Seconds per epoch's training pass from timed steps, and their peak memory."""
        clock = StepClock(self.advisor.timed_steps, warmup=WARMUP)
        trainer = self.trainer(depth, 1, [clock])
        with PeakMemory(self.device, collect=False) as memory, contextlib.suppress(StepsTimed):
            trainer.fit(self.train_loader)
        if self.precision is None:
            self.precision = trainer.state.precision
            self.channels_last = trainer.state.channels_last
            self.device = trainer.state.device
        per_step = clock.seconds_per_step
        steps = trainer.state.batches_per_epoch or 0
        seconds = (per_step * math.ceil(steps / trainer.config.accumulate_steps)
                   if per_step is not None and steps else None)
        # rank 0's clock on every process: the budget and the order of fine-tunes follow it
        depth.seconds_per_epoch, depth.peak_memory_mb = distributed.same_as_main(
            (seconds, memory.mib))


def advise(backbone: Backbone, data: Any, config: TrainConfig | None = None,
           **options: Any) -> Advice:
    """Measure every depth of `backbone` on `data` (an `ImageFolderData`, or a pair of train
    and val loaders) and recommend where to stop freezing; `options` go to `Advisor`."""
    if isinstance(data, (tuple, list)):
        train_loader, val_loader = data
    else:
        train_loader, val_loader = data.train_loader(), data.val_loader()
    return Advisor(config, **options).run(backbone, train_loader, val_loader)


# -- the frontier plot --------------------------------------------------------------------------
def plot_frontier(advice: Advice, path: Path) -> Path | None:
    """Validation accuracy against seconds per epoch, one point per depth (the probe with its
    interval, the fine-tune where run); None where matplotlib is not installed."""
    try:
        from matplotlib.figure import Figure  # no pyplot: leaves the user's backend alone
    except ImportError:
        return None
    figure = Figure(figsize=(7, 4.5))
    axes = figure.add_subplot()
    for d in advice.depths:
        if d.seconds_per_epoch is None:
            continue
        if d.probe_val_accuracy is None and d.finetune_val_accuracy is None:
            axes.axvline(d.seconds_per_epoch, color="tab:gray", linestyle="--", linewidth=1)
            axes.annotate(f"{d.name}: {d.seconds_per_epoch:.2g} s", (d.seconds_per_epoch, 0.55),
                          xycoords=("data", "axes fraction"), fontsize=8, rotation=90,
                          xytext=(-10, 0), textcoords="offset points")
            continue
        if d.probe_val_accuracy is not None and d.probe_val_ci95 is not None:
            low, high = d.probe_val_ci95
            axes.errorbar(d.seconds_per_epoch, 100 * d.probe_val_accuracy,
                          yerr=[[100 * (d.probe_val_accuracy - low)],
                                [100 * (high - d.probe_val_accuracy)]],
                          fmt="o", color="tab:gray", capsize=3)
        if d.finetune_val_accuracy is not None:
            axes.plot(d.seconds_per_epoch, 100 * d.finetune_val_accuracy, "D", zorder=3,
                      color="tab:red" if d.name == advice.recommendation.depth else "tab:blue")
        top = max(v for v in (d.probe_val_accuracy, d.finetune_val_accuracy, 0.0)
                  if v is not None)
        axes.annotate(d.name, (d.seconds_per_epoch, 100 * top), textcoords="offset points",
                      xytext=(4, 4), fontsize=8)
    axes.set_xscale("log")
    axes.set_xlabel("seconds per epoch (training pass, log scale)")
    axes.set_ylabel("validation accuracy (%)")
    axes.set_title("grey: linear probe [95% CI] · blue: short fine-tune · red: recommended",
                   fontsize=9)
    figure.tight_layout()
    atomic_write(path, lambda file: figure.savefig(file, dpi=120, format="png"))
    return path
