"""The Trainer's seam to the activation cache: for each loader, which batches to run and which
forward to run them through.

After the strategy has set what trains, `ActivationCaches.plan` finds the cut — a torch.fx
graph split (`finetune.cache.cut`), for every architecture — or records why there is none.
`batches(loader, ...)` then answers per loader: `(the loader, the whole model)`, or `(stored
activations in the loader's own batch order, the suffix)`, filling the cache on first use.
`why_uncached(loader)` says why a loader runs the whole model. Nothing else in the loop knows
a cache exists.

A cache made with `keep=` cut points (`finetune.tuning.advisor`: every group boundary) stores the
activations at each of them from the same pass, and a later plan whose cut is one of them —
a backbone with equal prefix weights, frozen less — trains on them without another pass.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from finetune.cache.cut import (
    CutPoint,
    Traces,
    UncacheableError,
    find_cuts,
    multi_prefix,
    split_graph,
)
from finetune.cache.store import ActivationCache, Cut, fill_together, is_deterministic
from finetune.model.backbone import Backbone
from finetune.runtime.distributed import RowShard

log = logging.getLogger("finetune")
Forward = Callable[[torch.Tensor], torch.Tensor]
PrefixForward = Callable[[Forward, torch.Tensor], torch.Tensor]


def plan_cut(backbone: Backbone, traced: dict[Any, Traces] | None = None
             ) -> tuple[Cut | None, str]:
    """The cut for what the applied strategy freezes — the latest point of its traced graph
    after which one activation crosses — or (None, why there is none). Leaves the backbone
    in the mode it was in. `traced`: traces kept by what trains and which modules are in
    training mode, for backbones that are all copies of one model (tracing is most of the
    cost of planning)."""
    was_training = backbone.training
    try:
        traces = None
        if traced is not None:
            backbone.train()
            model = backbone.model
            structure = tuple((name, type(m)) for name, m in model.named_modules())
            key = (structure, tuple(p.requires_grad for p in model.parameters()),
                   tuple(m.training for m in model.modules()))
            if key not in traced:  # one evaluation trace serves every freezing of a structure
                known = next((t for k, t in traced.items() if k[0] == structure), None)
                traced[key] = find_cuts(model, lambda: backbone.train(),
                                        known.eval if known is not None else None)
            traces = traced[key]
        graph = split_graph(backbone.model, lambda: backbone.train(), traces=traces)
    except UncacheableError as error:
        return None, str(error)
    finally:
        backbone.train(was_training)
    return Cut(graph.position, graph.label, graph=graph), ""


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two modules hold equal parameters and buffers under the same names."""
    if a is b:
        return True
    ours, theirs = a.state_dict(), b.state_dict()
    return ours.keys() == theirs.keys() and all(
        ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape
        and (ours[k].data_ptr() == theirs[k].data_ptr() or torch.equal(ours[k], theirs[k]))
        for k in ours)


class ActivationCaches:
    """Which of fit's loaders run on stored prefix activations, and the forward for each.

    `mode` is `TrainConfig.feature_cache` ("auto", "on", "off"); only loaders named with
    `allow` (fit's train and val loaders) are cached, and `release` drops every activation.
    `keep`: cut points whose activations each fill stores too (those before the cut it fills
    for), from the same pass; they are kept until the context or the prefix weights change.
    `copies=True` promises that every backbone planned with this cache is a copy of one model
    (the advisor's depths): a trace of one then serves the others. `keep` may be set after
    `cut_for` has found the points.
    """

    def __init__(self, mode: str = "off", memory_budget: int = 0,
                 directory: str | Path | None = None, *, keep: Sequence[CutPoint] = (),
                 copies: bool = False) -> None:
        self.mode, self.memory_budget, self.directory = mode, memory_budget, directory
        self.keep = tuple(keep)
        self._traced: dict[Any, Traces] | None = {} if copies else None
        self.cut: Cut | None = None
        self.reason = "fit has not planned a cut"
        self._context: Any = None  # what the stored activations were computed under
        self.fill_seconds = 0.0  # time spent running the prefix to fill caches, all in all
        # by cut point, then id(loader); and the loaders held, so that no other loader takes
        # a cached one's id
        self._stored: dict[CutPoint, dict[int, ActivationCache]] = {}
        self._loaders: dict[int, Any] = {}
        self._cacheable: set[int] = set()
        self._vetoed: dict[int, str] = {}
        self._refused: dict[int, str] = {}

    def configure(self, mode: str, memory_budget: int, directory: str | Path | None) -> None:
        """A shared cache takes each trainer's settings; other settings drop what it holds."""
        if (mode, memory_budget, directory) != (self.mode, self.memory_budget, self.directory):
            self.release()
            self.cut = None
        self.mode, self.memory_budget, self.directory = mode, memory_budget, directory

    def __len__(self) -> int:
        """How many loaders' activations are held now for the planned cut."""
        return len(self._caches)

    @property
    def nbytes(self) -> int:
        """Bytes of activations held now, every cut point and loader together."""
        return sum(cache.nbytes for held in self._stored.values() for cache in held.values())

    @property
    def shared_nbytes(self) -> int:
        """Of `nbytes`, those in storage this machine's processes share (one copy for all)."""
        return sum(cache.nbytes for held in self._stored.values() for cache in held.values()
                   if cache.shared)

    @property
    def _caches(self) -> dict[int, ActivationCache]:
        """The planned cut's caches, by id(loader)."""
        if self.cut is None:
            return {}
        return self._stored.setdefault(self.cut.point, {})

    def cut_for(self, backbone: Backbone) -> Cut | None:
        """The cut `plan` would choose for `backbone` as its strategy freezes it now, found
        with the traces this cache shares among copies; nothing is planned."""
        return plan_cut(backbone, self._traced)[0]

    def stored(self, point: CutPoint, loader: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(activations, labels) of `loader`'s dataset at `point`, in dataset order."""
        cache = self._stored.get(point, {}).get(id(loader))
        if cache is None or cache.features is None or cache.labels is None:
            raise KeyError(f"no activations at {point.label} for this loader; a fit with a "
                           "cut at or after it fills them")
        return cache.features, cache.labels

    def plan(self, backbone: Backbone, context: Any = None) -> None:
        """Find the cut for what the strategy now freezes; activations of an unchanged prefix
        are kept (the suffix is re-traced: what trains after the cut may have changed).
        `context` is what else the activations depend on (device, precision, memory format);
        activations are kept only for the same context and a prefix with equal weights — also
        when another backbone (a copy trained at another lr) takes over a shared cache."""
        cut, reason = ((None, "feature_cache='off'") if self.mode == "off"
                       else plan_cut(backbone, self._traced))
        if cut is None and reason != self.reason:  # said once, and kept for why_uncached
            log.info("activation cache off for %s: %s", backbone.name, reason)
        held = self._stored.get(cut.point, {}) if cut is not None else {}
        stale = context != self._context or (cut is not None and not all(
            same_weights(cache.prefix, cut.graph.prefix) for cache in held.values()))
        if stale or (not self.keep and cut != self.cut):
            self._drop()
        elif cut is not None:
            for cache in held.values():
                cache.suffix = cut.graph.suffix
        self.cut, self.reason, self._context = cut, reason, context

    def allow(self, *loaders: Any, refused: dict[Any, str] | None = None) -> None:
        """Cache only these loaders (fit's own), except those `refused` names with a reason
        (e.g. training on mixed images), which always run the whole model."""
        self._cacheable = {id(loader) for loader in loaders if loader is not None}
        self._vetoed = {id(loader): reason for loader, reason in (refused or {}).items()}

    def release(self) -> None:
        """Activations can take GiBs; and once fit returns the weights may change."""
        self._drop()
        self._cacheable.clear()

    def _drop(self) -> None:
        self._stored.clear()
        self._loaders.clear()
        self._refused.clear()

    def describe(self, loader: Any) -> tuple[str | None, str | None]:
        """(where `loader`'s activations are cut, why it runs the whole model): one of the
        two is None."""
        return self.label(loader), self.why_uncached(loader)

    def label(self, loader: Any) -> str | None:
        """Where `loader`'s activations are cut (the prefix's last module), if cached."""
        cache = self._caches.get(id(loader))
        return cache.cut.label if cache is not None else None

    def why_uncached(self, loader: Any) -> str | None:
        """Why `loader` runs the whole model; None when it runs on stored activations."""
        if id(loader) in self._caches:
            return None
        if self.cut is None:
            return self.reason
        return self._refused.get(id(loader)) or self._refusal(loader) or None

    def batches(self, loader: Iterable[Any], backbone: Backbone, prefix_forward: PrefixForward,
                device: torch.device) -> tuple[Iterable[Any], Forward]:
        cache = self._cache_for(loader, backbone, prefix_forward, device)
        if cache is None:
            return loader, backbone
        return cache.batches(loader), cache.suffix

    def _refusal(self, loader: Any) -> str:
        if id(loader) in self._vetoed:
            return self._vetoed[id(loader)]
        if id(loader) not in self._cacheable:
            return "only fit's own loaders are cached"
        if not isinstance(loader, torch.utils.data.DataLoader) or loader.batch_sampler is None:
            return "the loader is not a torch DataLoader with a batch size"
        if self.mode == "auto" and not is_deterministic(loader.dataset):
            return ("the dataset does not declare itself deterministic (augmentation?); "
                    "feature_cache='on' vouches for it")
        return ""

    def _cache_for(self, loader: Iterable[Any], backbone: Backbone,
                   prefix_forward: PrefixForward, device: torch.device) -> ActivationCache | None:
        """The filled cache for one of fit's loaders, or None where caching is not exact."""
        if self.cut is None or id(loader) in self._refused:
            return None
        if id(loader) not in self._caches:
            refusal = self._refusal(loader)
            if refusal:
                self._refused[id(loader)] = refusal
                return None
            cache, kept = self._new_caches(backbone)
            started = time.perf_counter()
            try:
                fill_together([cache, *kept.values()], self._one_pass(backbone, cache, kept),
                              loader, prefix_forward, device,
                              shard=RowShard.for_dataset(len(loader.dataset)))
            except (MemoryError, UncacheableError) as error:
                if self.mode == "on" and isinstance(error, MemoryError):
                    raise
                warnings.warn(f"activation cache off: {error}", RuntimeWarning, stacklevel=4)
                self._refused[id(loader)] = str(error)
                return None
            finally:
                self.fill_seconds += time.perf_counter() - started
            self._caches[id(loader)], self._loaders[id(loader)] = cache, loader
            for point, other in kept.items():
                self._stored.setdefault(point, {})[id(loader)] = other
        return self._caches[id(loader)]

    def _new_caches(self, backbone: Backbone) -> tuple[ActivationCache,
                                                        dict[CutPoint, ActivationCache]]:
        """An empty cache for the planned cut, and one for each kept point before it."""
        cut = self.cut
        if cut is None:
            raise RuntimeError("no cut is planned")
        traces = cut.graph.traces
        kept = {}
        for point in self.keep:
            if point in traces.points and point.position < cut.index:
                graph = split_graph(backbone.model, lambda: None, at=point, traces=traces)
                kept[point] = ActivationCache(
                    backbone, Cut(point.position, point.label, graph=graph),
                    memory_budget=self.memory_budget, directory=self.directory)
        return ActivationCache(backbone, cut, memory_budget=self.memory_budget,
                               directory=self.directory), kept

    def _one_pass(self, backbone: Backbone, cache: ActivationCache,
                  kept: dict[CutPoint, ActivationCache]) -> Any:
        """The prefix that fills `cache` and every kept cut point's cache in one pass."""
        if not kept:
            return cache.prefix
        return multi_prefix(backbone.model, cache.cut.graph.traces,
                            [cache.cut.point, *kept])
