"""`Trainer`: the package's only training loop.

The Trainer owns the device, precision, optimizer and loop; the strategy decides what trains
(re-asked at every epoch where `strategy.changes_at(epoch)`) and the Trainer holds that
decision (`trainer.freeze`, a `FreezeState`); callbacks act at events.
`fit` runs the epochs; `_run_epoch` feeds each batch to `self.step` (`finetune.train.step`),
which holds everything one optimizer step does — lr, forward, loss, backward, accumulation,
clipping, scaler — so that path reads top to bottom in one place.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch
from torch import nn
from torch.optim import Optimizer

from finetune.cache.plan import ActivationCaches, Forward
from finetune.errors import DataError
from finetune.model.backbone import Backbone
from finetune.runtime import distributed
from finetune.runtime.memory import keep_freed_memory, restore_malloc_defaults
from finetune.runtime.precision import (
    autocast,
    resolve_channels_last,
    resolve_precision,
    uses_convolutions,
)
from finetune.stats.metrics import EvaluationReport
from finetune.strategies import FreezeState, FreezeStrategy
from finetune.train.checkpoint import (
    CHECKPOINT_FORMAT,
    check_compatible,
    load_checkpoint,
    rng_state,
    set_rng_state,
)
from finetune.train.config import TrainConfig
from finetune.train.events import (
    Callback,
    Event,
    StopFit,
    callback_keys,
    dispatch,
    notify_exception,
)
from finetune.train.range_test import LrFinding, RangeTest
from finetune.train.recipes import BatchMixing, WeightAverage, class_weights, dataset_labels
from finetune.train.schedules import EpochScheduler, StepSchedule, total_steps
from finetune.train.state import History, StepOutput, TrainState
from finetune.train.step import NonFiniteLossError, OptimizerStep

TTA_MODES = ("none", "flip")  # test-time augmentation of evaluate / predict
MIXED_IMAGES = ("MixUp/CutMix mix the training images, so the training pass runs the whole "
                "model")


class Trainer:
    """Fit a `Backbone` under a `FreezeStrategy`.

    `optimizer`: None (Adam at `config.lr` / `config.weight_decay`), a factory called with the
    strategy's param groups, or an instance used as a template (its class and `defaults`) —
    the optimizer is rebuilt whenever the strategy changes what trains, so it only ever holds
    trainable parameters. `scheduler`: None or a factory `optimizer -> LRScheduler`, stepped
    once per epoch as a factor on every group's lr (ReduceLROnPlateau gets the validation
    loss; `finetune.train.schedules.EpochScheduler`). `loss`: None
    (CrossEntropyLoss), a module, a module class, or a function `(logits, labels) -> loss`.
    `classes`: class names for reports; taken from `train_loader.dataset.classes` if absent.
    """

    def __init__(
        self,
        backbone: Backbone,
        strategy: FreezeStrategy | None,
        config: TrainConfig | None = None,
        callbacks: Sequence[Callback] = (),
        *,
        optimizer: OptimizerSpec = None,
        scheduler: SchedulerSpec = None,
        loss: LossSpec = None,
        classes: Sequence[str] | None = None,
        activations: ActivationCaches | None = None,
    ) -> None:
        if strategy is not None and not isinstance(strategy, FreezeStrategy):
            raise TypeError(
                f"strategy must be a FreezeStrategy (got {type(strategy).__name__}); e.g. "
                "finetune.build_strategy('last-layer'), or None to evaluate a trained model "
                "as it is."
            )
        self.backbone = backbone
        self.strategy = strategy
        self.freeze: FreezeState | None = None  # the strategy's decision for this epoch
        self.config = config or TrainConfig()
        self.callbacks: list[Callback] = list(callbacks)
        self._optimization = Optimization(optimizer, scheduler)
        self._loss_spec = loss
        if loss is not None and self.config.class_weights != "none":
            raise ValueError("class_weights applies to the default cross-entropy loss, but a "
                             "custom loss= was given; weight the classes inside that loss.")
        self.loss_fn = make_loss(loss, self.config.label_smoothing)  # training
        self.eval_loss_fn = make_loss(loss) if loss is not None else self.loss_fn
        if self.config.label_smoothing:  # validation loss stays comparable across runs
            self.eval_loss_fn = make_loss(None)
        self.mixing: BatchMixing | None = None  # MixUp / CutMix; fit builds it (class count)
        self.average: WeightAverage | None = None  # the EMA of a fit with ema_decay
        self.step: OptimizerStep | None = None  # fit builds it, with its parts
        self._compiled_forwards: list[tuple[Forward, Forward]] = []  # config.compile's
        self.classes: list[str] | None = list(classes) if classes is not None else None
        self.optimizer: Optimizer | None = None
        self.scheduler: EpochScheduler | None = None  # scheduler=, as a factor on the lr
        self.state = TrainState()
        self._prepared = False
        # `activations`: a cache shared with trainers of the same frozen prefix (learning-rate
        # candidates, `finetune.tuning.search`); it outlives fit, its owner releases it
        self._shared_activations = activations
        self.activations = activations if activations is not None else ActivationCaches()
        self.parallel = distributed.DataParallel()  # DDP under torchrun, else nothing
        self._data: dict[str, Any] | None = None  # data_identity of the loader fit trains on
        self._preprocessing: dict[str, Any] | None = None  # its images' size and normalisation

    @property
    def history(self) -> History:
        return self.state.history

    # -- public API ---------------------------------------------------------------------------
    def fit(
        self,
        train_loader: Iterable[Any],
        val_loader: Iterable[Any] | None = None,
        resume: str | Path | None = None,
    ) -> History:
        """Train for `config.epochs` epochs (from the checkpoint's next epoch if `resume`)."""
        config, strategy = self.config, self.strategy
        if strategy is None:
            raise ValueError("fit needs a strategy (what trains); a Trainer built with "
                             "strategy=None evaluates and predicts only.")
        distributed.start(config.device)  # under torchrun: each process trains its share
        train_loader = distributed.shard_loader(train_loader, config.seed)
        val_loader = None if val_loader is None else distributed.shard_loader(val_loader)
        self._resolve_classes(train_loader)
        self._data = data_identity(self.classes or [], train_loader)
        self._preprocessing = trained_preprocessing(train_loader)
        seed = None if config.seed is None else distributed.rank_seed(config.seed)
        if seed is not None:
            seed_everything(seed)
            self.backbone.draw_fresh(config.seed)  # a new head: the run's, on every rank
        checkpoint = load_checkpoint(resume) if resume is not None else None
        if checkpoint is not None and int(checkpoint["epoch"]) + 1 >= config.epochs:
            done = int(checkpoint["epoch"]) + 1
            raise ValueError(
                f"{resume} has already trained {done} epoch{'s' * (done != 1)}; epochs="
                f"{config.epochs} leaves none to train. Ask for more (--epochs {done + 1} or "
                "more) to continue; nothing was written.")
        configured_epoch = checkpoint["epoch"] if checkpoint is not None else 0
        self.state = TrainState(start_epoch=configured_epoch + (checkpoint is not None))
        self._compiled_forwards = []  # compiled anew for each fit
        self.scheduler = self._optimization.epoch_scheduler()
        batches_per_epoch = loader_length(train_loader)  # the step's schedule spans the run
        self._prepare(configured_epoch, train_loader, chosen=checkpoint)
        if checkpoint is not None:  # after the strategy ran: adapters (LoRA) rename weights
            check_compatible(checkpoint, self.backbone, strategy, resume, self._data, config)
            distributed.check_world_size(checkpoint, resume)
        self._prepare_recipes(train_loader)
        self.step = self._build_step(batches_per_epoch)
        self.activations.allow(train_loader, val_loader, refused={
            train_loader: MIXED_IMAGES} if self.mixing is not None else None)
        self._configure_optimizer(configured_epoch, previous=None)
        if checkpoint is not None:
            self._restore(checkpoint)
        try:
            dispatch(self.callbacks, Event.FIT_START, self)
            for epoch in range(self.state.start_epoch, config.epochs):
                self.state.epoch = epoch
                if epoch != configured_epoch and strategy.changes_at(epoch):
                    self._freeze(strategy, epoch)
                    self.activations.plan(self.backbone, self._fill_context())
                    self._configure_optimizer(epoch, previous=self.optimizer)
                if seed is not None:
                    reseed(epoch_seed(seed, epoch), train_loader)
                set_sampler_epoch(train_loader, epoch)
                self.state.batches_per_epoch = loader_length(train_loader)  # for this epoch
                dispatch(self.callbacks, Event.EPOCH_START, self, epoch=epoch)
                started, filled = time.perf_counter(), self.activations.fill_seconds
                metrics = {"epoch": float(epoch), **self._run_epoch(train_loader)}
                if val_loader is not None:
                    dispatch(self.callbacks, Event.VALIDATION_START, self)
                    report = self.state.val_report = self._evaluate(val_loader)
                    metrics.update(self._report_metrics(report))
                    dispatch(self.callbacks, Event.VALIDATION_END, self, report=report)
                metrics.update(learning_rates(self._require_optimizer()))
                if self.scheduler is not None:
                    self.scheduler.step(metrics)
                metrics["epoch_seconds"] = time.perf_counter() - started
                metrics["cache_fill_seconds"] = self.activations.fill_seconds - filled
                self.history.records.append(metrics)
                dispatch(self.callbacks, Event.EPOCH_END, self, metrics=metrics)
                self.state.should_stop = distributed.any_rank(self.state.should_stop)
                if self.state.should_stop:
                    self.history.stopped_early = epoch + 1 < config.epochs
                    break
            if self.average is not None:  # the weights validation measured are the result
                self.average.copy_to(self.backbone.model)
                self.average = None
            dispatch(self.callbacks, Event.FIT_END, self, history=self.history)
        except BaseException as error:
            notify_exception(self.callbacks, self, error)
            raise
        finally:  # activations can take GiBs; and after fit the weights may change
            if self._shared_activations is None:
                self.activations.release()
            # DDP's wrapper holds the process group (and its gradient buckets): kept past the
            # fit, it keeps the group's threads alive after distributed.stop() (docs/distributed.md)
            self.parallel.reset()
            if self.state.malloc_tuned:  # process-wide: scoped to this fit
                restore_malloc_defaults()
        return self.history

    def evaluate(self, loader: Iterable[Any], tta: str = "none") -> EvaluationReport:
        """Loss, accuracy, per-class metrics and confusion matrix on `loader`. `tta="flip"`:
        each image's probabilities averaged with its mirror image's (test-time augmentation;
        the whole model runs, never stored activations)."""
        self._ensure_ready(loader)
        return self._evaluate(loader, tta)

    def predict(self, loader: Iterable[Any], probabilities: bool = False,
                tta: str = "none") -> torch.Tensor:
        """Predicted class indices (or softmax probabilities) for every image in `loader`,
        on the CPU; labels in the batches, if any, are ignored. `tta` as for `evaluate`."""
        self._ensure_ready(loader)
        outputs = [logits.float().cpu() for logits, _ in self._inference(loader, tta)]
        if not outputs:
            return torch.empty(0, dtype=torch.float32 if probabilities else torch.long)
        logits = torch.cat(outputs)
        return logits.softmax(dim=1) if probabilities else logits.argmax(dim=1)

    def lr_find(self, train_loader: Iterable[Any], *, start: float = 1e-7, end: float = 1.0,
                steps: int = 100) -> LrFinding:
        """The learning-rate range test (`finetune.train.range_test`): this trainer's strategy,
        optimizer and loss, trained at an lr growing from `start` to `end` over `steps`
        optimizer steps (or until the loss diverges). It trains a copy of the backbone (what a
        strategy adds, such as LoRA's adapters, stays on the copy) and puts every RNG back, so
        a `fit` after it runs as without it. Single-process."""
        if self.strategy is None:
            raise ValueError("lr_find needs a strategy (what trains)")
        if distributed.world_size() > 1:
            raise ValueError("lr_find runs in one process; run it before launching torchrun")
        test = RangeTest(start, end, steps)
        batches = loader_length(train_loader) or steps
        config = attrs.evolve(self.config, epochs=math.ceil(steps / batches) + 1,
                              schedule="constant", warmup=None, ema_decay=None)
        probe = Trainer(copy.deepcopy(self.backbone), copy.deepcopy(self.strategy), config,
                        [test], optimizer=self._optimization.optimizer_spec,
                        loss=self._loss_spec, classes=self.classes,
                        activations=self._shared_activations)
        generators = rng_state()
        try:
            probe.fit(train_loader)
        except StopFit:
            pass
        except NonFiniteLossError:
            test.ended = "diverged"
        finally:
            set_rng_state(generators)
        return test.finding()

    # -- checkpoint state ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs, as tensors and plain data (loads with weights_only)."""
        optimizer = self._require_optimizer()
        keys = callback_keys(self.callbacks)
        return {
            "format": CHECKPOINT_FORMAT,
            "backbone": {"name": self.backbone.name, "num_classes": self.backbone.num_classes},
            "classes": list(self.classes or []),
            "data": self._data,
            "preprocessing": self._preprocessing,
            "model": {k: v.detach().cpu() for k, v in self.backbone.model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "strategy": self.strategy.state_dict() if self.strategy is not None else None,
            "epoch": self.state.epoch,
            "world_size": distributed.world_size(),
            "global_step": self.state.global_step,
            "scaler": self._require_step().state_dict(),
            "ema": self.average.state_dict() if self.average is not None else None,
            "precision": self.state.precision,  # the timed choices: a resume keeps them
            "channels_last": self.state.channels_last,
            "history": self.history.to_dict(),
            "rng": rng_state(),
            "callbacks": {k: cb.state_dict() for k, cb in zip(keys, self.callbacks, strict=True)},
            "config": attrs.asdict(self.config),
        }

    # -- setup --------------------------------------------------------------------------------
    def _resolve_classes(self, loader: Iterable[Any]) -> None:
        self.classes = resolve_classes(self.classes, loader, self.backbone)

    def _prepare(self, epoch: int, loader: Iterable[Any], training: bool = True,
                 chosen: dict[str, Any] | None = None) -> None:
        """Device, strategy, precision and memory format (probed with the strategy applied,
        or as `chosen` — a checkpoint — records, so a resume computes as its run did);
        evaluation alone (`training=False`) neither tunes malloc nor probes nor caches."""
        config, state = self.config, self.state
        if chosen is not None and chosen.get("precision") is not None:
            config = attrs.evolve(config, **{
                name: chosen[name] if getattr(config, name) == "auto" else getattr(config, name)
                for name in ("precision", "channels_last")})
        state.device = distributed.local_device(config.device)
        if training and config.keep_freed_memory and state.device.type == "cpu":
            state.malloc_tuned = keep_freed_memory()
        self.backbone.to(state.device)
        if self.strategy is not None:  # None: evaluate the model as it is
            self._freeze(self.strategy, epoch)
        shape = sample_shape(loader, self.backbone.preprocessing.crop_size)
        probe = training and distributed.is_main()  # the other processes take rank 0's verdict
        state.precision = resolve_precision(
            config.precision, self.backbone, state.device, shape, probe=probe,
            channels_last=(uses_convolutions(self.backbone) if config.channels_last == "auto"
                           else bool(config.channels_last)))
        state.channels_last = resolve_channels_last(  # NHWC only where measured faster
            config.channels_last, self.backbone, state.device, shape, state.precision, probe)
        state.precision, state.channels_last = distributed.same_as_main(  # one verdict for all
            (state.precision, state.channels_last))
        self.backbone.to(memory_format=torch.channels_last if state.channels_last
                         else torch.contiguous_format)
        settings = (config.feature_cache, int(config.cache_memory_gb * 2**30),
                    config.activation_cache_dir)
        if self._shared_activations is not None:
            self.activations.configure(*settings)
        else:
            self.activations = ActivationCaches(*settings)
        if training:
            self.activations.plan(self.backbone, self._fill_context())
        self._prepared = True

    def _fill_context(self) -> tuple[Any, ...]:
        """What a prefix's activations depend on besides its weights and the images."""
        return str(self.state.device), self.state.precision, self.state.channels_last

    def _prefix_forward(self, prefix: Forward, images: torch.Tensor) -> torch.Tensor:
        if self.state.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return self._forward(images, prefix)

    def _route(self, loader: Iterable[Any]) -> tuple[Iterable[Any], Forward]:
        """(loader, model) or (cached activations, suffix), as the cache decides."""
        return self.activations.batches(loader, self.backbone, self._prefix_forward,
                                         self.state.device)

    def _ensure_ready(self, loader: Iterable[Any]) -> None:
        if not self._prepared:
            self._resolve_classes(loader)
            self._prepare(0, loader, training=False)

    def _prepare_recipes(self, train_loader: Iterable[Any]) -> None:
        """The moving average, batch mixing and class-weighted loss the config asks for."""
        config, classes = self.config, self.backbone.num_classes
        self.average = WeightAverage(config.ema_decay) if config.ema_decay else None
        self.mixing = (BatchMixing(classes, config.mixup, config.cutmix)
                       if config.mixup or config.cutmix else None)
        if config.class_weights == "balanced":
            labels = dataset_labels(train_loader)
            if labels is None:
                raise DataError("class_weights='balanced' needs the training labels: a loader "
                                "whose dataset lists `samples` (ImageFolder, finetune.data) "
                                "or `targets`.")
            self.loss_fn = make_loss(None, config.label_smoothing,
                                     class_weights(labels, classes).to(self.state.device))
            if self._loss_spec is None:  # validation loss stays unweighted, comparable
                self.eval_loss_fn = make_loss(None)

    def _build_step(self, batches_per_epoch: int | None) -> OptimizerStep:
        """The optimizer step of this fit, with every part it uses: the training loss, the
        per-step lr schedule over the run, clipping, accumulation, device and precision."""
        config = self.config
        schedule = StepSchedule(config.schedule, config.warmup, total_steps(
            config.epochs, batches_per_epoch, config.accumulate_steps), self.scheduler)
        return OptimizerStep(self.loss_fn, config.max_grad_norm, config.accumulate_steps,
                             schedule, self.state.device, self.state.precision)

    def _require_step(self) -> OptimizerStep:
        if self.step is None:
            raise RuntimeError("the optimizer step is built by fit()")
        return self.step

    def _freeze(self, strategy: FreezeStrategy, epoch: int) -> None:
        """The strategy decides for `epoch`; the decision is applied and held."""
        self.freeze = strategy.decide(self.backbone, epoch)
        self.state.freeze_report = self.freeze.apply(self.backbone)

    def _configure_optimizer(self, epoch: int, previous: Optimizer | None) -> None:
        if self.freeze is None or self.strategy is None:
            raise RuntimeError("the optimizer is built from a strategy's decision in fit()")
        groups = self.freeze.param_groups(self.backbone, self.config.lr,
                                          self.config.weight_decay,
                                          self.config.decay_norm_and_bias)
        self.parallel.reset()  # DDP registers the parameters that train now
        self.optimizer = self._optimization.build(
            groups, epoch, self.config, self.strategy.describe(), previous)

    def _restore(self, checkpoint: dict[str, Any]) -> None:
        self.backbone.model.load_state_dict(checkpoint["model"])
        self._require_optimizer().load_state_dict(checkpoint["optimizer"])
        if self.scheduler is not None and checkpoint["scheduler"] is not None:
            self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.state.history = History.from_dict(checkpoint["history"])
        self.state.global_step = int(checkpoint["global_step"])
        self._require_step().load_state_dict(checkpoint.get("scaler"))  # older: none
        if self.average is not None and checkpoint.get("ema"):
            self.average.load_state_dict(checkpoint["ema"])
        self.state.epoch = int(checkpoint["epoch"])
        saved = checkpoint["callbacks"]
        for key, callback in zip(callback_keys(self.callbacks), self.callbacks, strict=True):
            if key in saved:
                callback.load_state_dict(saved[key])
        set_rng_state(checkpoint["rng"])

    # -- the loop -----------------------------------------------------------------------------
    def _run_epoch(self, loader: Iterable[Any]) -> dict[str, float]:
        """One training pass; its metrics include `train_seconds` (filling an activation cache
        and waiting for data count, validation does not) and `train_images`."""
        started = time.perf_counter()
        self.backbone.train()
        total_loss, correct, count = 0.0, 0, 0
        batches, forward = self._route(loader)
        forward = self._compiled(self.parallel.wrap(self.backbone, forward, self.state.device))
        self.state.cached_prefix, self.state.uncached_reason = self.activations.describe(loader)
        optimizer, step = self._require_optimizer(), self._require_step()
        for index, (batch, last) in enumerate(flag_last(
                batches, self.state.batches_per_epoch, step.accumulate_steps > 1)):
            self.state.batch = index
            outputs = self._train_step(batch, forward, closes_epoch=last)
            if outputs.stepped:
                self._stepped()
            total_loss += outputs.loss * outputs.count
            correct += outputs.correct
            count += outputs.count
            dispatch(self.callbacks, Event.TRAIN_BATCH_END, self, batch=batch, outputs=outputs)
        total_loss, correct, count = distributed.sums(total_loss, correct, count)
        if count == 0:
            raise ValueError("the training loader yielded no batches")
        if step.pending:  # a loader shorter than its len(): its last window still steps
            step.update(optimizer)
            self._stepped()
        return {"train_loss": total_loss / count, "train_accuracy": correct / count,
                "train_seconds": time.perf_counter() - started, "train_images": float(count)}

    def _compiled(self, forward: Forward) -> Forward:
        """`forward` under torch.compile where `config.compile` asks for it: compiled once per
        fit and model (the whole backbone, or the suffix after the cache's cut), reused every
        epoch; the optimizer step still sees the model's own `no_sync`."""
        if not self.config.compile:
            return forward
        for source, compiled in self._compiled_forwards:
            if source is forward:
                return compiled
        compiled = torch.compile(forward)
        self._compiled_forwards.append((forward, compiled))
        return compiled

    def _stepped(self) -> None:
        self.state.global_step += 1
        if self.average is not None:
            self.average.update(self.backbone.model)
        dispatch(self.callbacks, Event.OPTIMIZER_STEP, self, step=self.state.global_step)

    def _train_step(self, batch: Any, forward: Forward | None = None,
                    closes_epoch: bool = False) -> StepOutput:
        """One optimizer step through `forward` (the whole model unless the cache routes the
        batch through the suffix); `self.step` does the zero_grad/backward/clip/step."""
        images, labels = self._to_device(batch)
        if labels is None:
            raise ValueError("training batches must hold (images, labels)")
        targets = None
        if self.mixing is not None:
            images, targets = self.mixing(images, labels)
        model = forward if forward is not None else self.backbone  # a compiled module has no len
        return self._require_step()(
            self._require_optimizer(), model, images, labels, targets=targets,
            step=self.state.global_step, closes_epoch=closes_epoch,
            where=f"epoch {self.state.epoch}, batch {self.state.batch}")

    def _forward(self, images: torch.Tensor, forward: Forward | None = None) -> torch.Tensor:
        with autocast(self.state.device, self.state.precision):
            return (forward if forward is not None else self.backbone)(images)

    def _to_device(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        images, labels = split_batch(batch)
        device = self.state.device
        images = images.to(device, non_blocking=True)
        if self.state.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        if labels is not None:
            labels = labels.to(device, non_blocking=True)
        return images, labels

    def _inference(self, loader: Iterable[Any], tta: str = "none"
                   ) -> Iterable[tuple[torch.Tensor, Any]]:
        """(logits, labels) of every sample; each process computes its share. Under
        `tta="flip"` the logits are log-probabilities averaged with the mirror image's."""
        if tta not in TTA_MODES:
            raise ValueError(f"tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
        loader = distributed.shard_loader(loader)
        return distributed.gather_outputs(self._local_inference(loader, tta), loader)

    def _local_inference(self, loader: Iterable[Any], tta: str = "none"
                         ) -> Iterable[tuple[torch.Tensor, Any]]:
        was_training = self.backbone.training
        self.backbone.eval()
        try:
            with torch.inference_mode():  # mirrored images need the whole model
                batches, forward = ((loader, self.backbone) if tta == "flip"
                                    else self._route(loader))
                for batch in batches:
                    images, labels = self._to_device(batch)
                    logits = self._forward(images, forward)
                    if tta == "flip":
                        logits = average_probabilities(
                            logits, self._forward(images.flip(3), forward))
                    yield logits, labels
        finally:
            self.backbone.train(was_training)

    def _evaluate(self, loader: Iterable[Any], tta: str = "none") -> EvaluationReport:
        """The report of the weights a run validates: during a fit with `ema_decay`, the
        moving average (swapped in for the pass)."""
        with (self.average.swapped_in(self.backbone.model) if self.average is not None
              else contextlib.nullcontext()):
            return self._report(loader, tta)

    def _report(self, loader: Iterable[Any], tta: str) -> EvaluationReport:
        predictions, targets, losses, confidences = [], [], [], []
        total_loss, count = 0.0, 0
        for logits, labels in self._inference(loader, tta):
            if labels is None:
                raise ValueError("evaluation batches must hold (images, labels)")
            total_loss += float(self.eval_loss_fn(logits.float(), labels)) * len(labels)
            count += len(labels)
            predictions.append(logits.argmax(dim=1).cpu())
            targets.append(labels.cpu())
            # each image's cross-entropy and confidence from one log-softmax
            log_probabilities = logits.float().log_softmax(dim=1)
            losses.append(-log_probabilities.gather(1, labels[:, None]).squeeze(1).cpu())
            confidences.append(log_probabilities.amax(dim=1).exp().cpu())
        if count == 0:
            raise ValueError("the evaluation loader yielded no batches")
        return EvaluationReport.from_predictions(
            torch.cat(targets), torch.cat(predictions), self.classes or self.backbone.num_classes,
            loss=total_loss / count, losses=torch.cat(losses), confidences=torch.cat(confidences),
        )

    def _require_optimizer(self) -> Optimizer:
        if self.optimizer is None:
            raise RuntimeError("the optimizer is built by fit(); call fit() first")
        return self.optimizer

    # -- bookkeeping --------------------------------------------------------------------------
    @staticmethod
    def _report_metrics(report: EvaluationReport) -> dict[str, float]:
        return {"val_loss": float(report.loss or 0.0), "val_accuracy": report.accuracy,
                "val_macro_f1": report.macro_f1}


# -- what the loop needs of loaders, batches, seeds and the device: plain functions, so a
# custom loop can reuse them ----------------------------------------------------------------
LossSpec = nn.Module | type[nn.Module] | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None




def average_probabilities(*logits: torch.Tensor) -> torch.Tensor:
    """The log of the mean softmax of several views' logits: log-probabilities, so argmax,
    softmax and cross-entropy read them as logits."""
    stacked = torch.stack([view.float().log_softmax(dim=1) for view in logits])
    return torch.logsumexp(stacked, dim=0) - math.log(len(logits))


def epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images, labels) from a tuple/list batch, a dict batch, or bare images."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, dict):
        images = batch.get("image", batch.get("images"))
        labels = batch.get("label", batch.get("labels"))
        if images is None:
            raise ValueError(f"a dict batch needs an 'image' key; got keys {sorted(batch)}")
        return images, labels
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise TypeError(f"cannot read images and labels from a batch of type {type(batch).__name__}")


def sample_shape(loader: Iterable[Any], crop: int) -> tuple[int, ...]:
    dataset = getattr(loader, "dataset", None)
    try:
        images, _ = split_batch(dataset[0])  # type: ignore[index]
        return tuple(images.shape)
    except Exception:
        return (3, crop, crop)


def reseed(seed: int, loader: Iterable[Any]) -> None:
    """Seed every RNG from (seed, epoch): shuffling, dropout and augmentation of an epoch
    then do not depend on what ran before it, so a resumed run matches a straight one."""
    seed_everything(seed)
    for generator in (getattr(loader, "generator", None),
                      getattr(getattr(loader, "sampler", None), "generator", None)):
        if isinstance(generator, torch.Generator):
            generator.manual_seed(seed)


def loader_length(loader: Iterable[Any]) -> int | None:
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def dataset_classes(loader: Iterable[Any]) -> list[Any] | None:
    """Class names a loader's dataset declares (ImageFolder, finetune.data), if any."""
    names = getattr(getattr(loader, "dataset", None), "classes", None)
    return list(names) if names is not None else None


def resolve_classes(classes: list[str] | None, loader: Iterable[Any], model: Any) -> list[str]:
    """Class names for reports: `classes` if given, else the loader's dataset's, else "0"…"K-1";
    refuses names that do not match `model.num_classes` (a head built for other data)."""
    if classes is None:
        names = dataset_classes(loader)
        if names is not None and len(names) != model.num_classes:
            raise DataError(
                f"the data has {len(names)} classes ({', '.join(map(str, names[:5]))}"
                f"{', …' if len(names) > 5 else ''}) but {model.name}'s head has "
                f"{model.num_classes} outputs; build the backbone with "
                f"num_classes={len(names)}."
            )
        classes = ([str(n) for n in names] if names is not None
                   else [str(i) for i in range(model.num_classes)])
    if len(classes) != model.num_classes:
        raise ValueError(f"{len(classes)} class names for a {model.num_classes}-class head")
    return classes


def set_sampler_epoch(loader: Iterable[Any], epoch: int) -> None:
    """Tell an epoch-aware sampler (DistributedSampler, finetune.data's SeededShuffle) which
    epoch runs, so its order depends on the epoch number alone — also after a resume."""
    set_epoch = getattr(getattr(loader, "sampler", None), "set_epoch", None)
    if callable(set_epoch):
        set_epoch(epoch)


def make_loss(loss: LossSpec, label_smoothing: float = 0.0,
              class_weights: torch.Tensor | None = None
              ) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss function for a `Trainer(loss=...)` spec (None: cross-entropy, with
    `label_smoothing` and per-class `class_weights`; a custom loss smooths labels itself, if
    it wants to)."""
    if loss is None:
        return nn.CrossEntropyLoss(weight=class_weights, label_smoothing=label_smoothing)
    if label_smoothing:
        raise ValueError(
            f"label_smoothing={label_smoothing} applies to the default cross-entropy loss, "
            "but a custom loss= was given; smooth inside that loss (e.g. "
            "nn.CrossEntropyLoss(label_smoothing=...)) and leave label_smoothing at 0."
        )
    if isinstance(loss, type):
        return loss()
    if not callable(loss):
        raise TypeError(f"loss must be a module, a module class or a function, not {loss!r}")
    return loss


# -- the optimizer, rebuilt whenever the strategy changes what trains, so it only ever holds
# trainable parameters --------------------------------------------------------------------------
_PLATEAU = torch.optim.lr_scheduler.ReduceLROnPlateau

OptimizerSpec = Optimizer | Callable[[list[dict[str, Any]]], Optimizer] | None
SchedulerSpec = Callable[[Optimizer], Any] | None


class Optimization:
    """Builds the optimizer from a strategy's param groups, and the run's epoch scheduler.

    `optimizer`: None (`config.optimizer` — Adam, AdamW or SGD — at `config.lr`, its weight
    decay set per group), a factory called with the groups, or an instance used as a template
    (its class and `defaults`). `scheduler`: None
    or a factory `optimizer -> LRScheduler`, stepped once per epoch as a factor on every
    group's lr (`finetune.train.schedules.EpochScheduler`).
    """

    def __init__(self, optimizer: OptimizerSpec, scheduler: SchedulerSpec) -> None:
        if scheduler is not None and (not callable(scheduler) or isinstance(
            scheduler, (torch.optim.lr_scheduler.LRScheduler, _PLATEAU))):
            raise TypeError(
                "scheduler must be a factory taking the optimizer, e.g. "
                "functools.partial(torch.optim.lr_scheduler.StepLR, step_size=5): a scheduler "
                "instance is bound to one optimizer, and the Trainer builds its own."
            )
        self.optimizer_spec = optimizer
        self._scheduler_spec = scheduler

    def epoch_scheduler(self) -> EpochScheduler | None:
        """A fresh epoch scheduler for a run, if `scheduler=` was given."""
        return EpochScheduler(self._scheduler_spec) if self._scheduler_spec else None

    def build(self, groups: list[dict[str, Any]], epoch: int, config: TrainConfig,
              description: str, previous: Optimizer | None) -> Optimizer:
        """The optimizer over `groups` (a strategy's param groups for `epoch`), carrying
        per-parameter state (e.g. Adam moments) over from `previous` for parameters that still
        train — and none for the rest."""
        if not groups:
            raise ValueError(
                f"{description} leaves nothing trainable at epoch {epoch}; "
                "there is nothing to optimise."
            )
        optimizer = self._make_optimizer(groups, config)
        held = [p for g in optimizer.param_groups for p in g["params"]]
        frozen = sum(1 for p in held if not p.requires_grad)
        if frozen:
            raise ValueError(f"the optimizer factory added {frozen} frozen parameters; build "
                             "the optimizer from the param groups it is given.")
        if previous is not None:
            for parameter in held:
                if parameter in previous.state:
                    optimizer.state[parameter] = previous.state[parameter]
        return optimizer

    def _make_optimizer(self, groups: list[dict[str, Any]], config: TrainConfig) -> Optimizer:
        spec = self.optimizer_spec
        if spec is None:
            return default_optimizer(groups, config)
        if isinstance(spec, Optimizer):
            return type(spec)(groups, **spec.defaults)
        return spec(groups)


def default_optimizer(groups: list[dict[str, Any]], config: TrainConfig) -> Optimizer:
    """`config.optimizer` over `groups`; a group's own `weight_decay` (0 for biases and norms,
    `FreezeState.param_groups`) overrides the default."""
    decay = config.weight_decay
    if config.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=config.lr, weight_decay=decay)
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov, weight_decay=decay)
    return torch.optim.Adam(groups, lr=config.lr, weight_decay=decay)


def learning_rates(optimizer: Optimizer) -> dict[str, float]:
    """`lr/<group name>` of each param group (numbered when a name repeats)."""
    rates, seen = {}, {}
    for group in optimizer.param_groups:
        name = str(group.get("name", "group"))
        seen[name] = seen.get(name, 0) + 1
        key = f"lr/{name}" if seen[name] == 1 else f"lr/{name}#{seen[name]}"
        rates[key] = float(group["lr"])
    return rates

def flag_last(batches: Iterable[Any], length: int | None, look_ahead: bool
              ) -> Iterator[tuple[Any, bool]]:
    """Each batch with whether it is the epoch's last: by `length` when known, else (with
    `look_ahead`, needed only when accumulating) by fetching one batch ahead."""
    if length is not None or not look_ahead:
        for index, batch in enumerate(batches):
            yield batch, length is not None and index + 1 == length
        return
    iterator = iter(batches)
    current = next(iterator, _END)
    while current is not _END:
        following = next(iterator, _END)
        yield current, following is _END
        current = following


_END = object()

def trained_preprocessing(loader: Iterable[Any]) -> dict[str, Any] | None:
    """The resize, crop and normalisation of the images a loader serves, where its dataset
    says (ours do): a checkpoint carries it, so a copy without its run.json still predicts
    at the size it trained at. None for a dataset that does not say."""
    preprocessing = getattr(getattr(loader, "dataset", None), "preprocessing", None)
    return attrs.asdict(preprocessing) if attrs.has(type(preprocessing)) else None


def data_identity(classes: Sequence[str], loader: Iterable[Any]) -> dict[str, Any]:
    """What a run trains on: its class names, and — for datasets that list (path, label)
    samples — their count and a digest of the sorted `class-folder/file-stem` and label of each.
    Stems, not full paths: a dataset moved to another folder (or pre-resized) is the same data."""
    samples = getattr(getattr(loader, "dataset", None), "samples", None)
    record: dict[str, Any] = {"classes": [str(c) for c in classes], "count": None,
                              "samples": None}
    if samples is not None:
        entries = sorted(f"{Path(p).parent.name}/{Path(p).stem}\0{int(label)}"
                         for p, label in samples)
        record["count"] = len(entries)
        record["samples"] = hashlib.sha1("\n".join(entries).encode()).hexdigest()[:16]
    return record
