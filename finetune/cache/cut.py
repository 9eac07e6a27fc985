"""Cut any traceable model after an exactly-frozen prefix (torch.fx): the one way models are
cut, for the activation cache and for probing features at several depths.

The activation cache stores what a frozen prefix computes for each image. Every model — the
ResNet family included: a declared chain measured no faster (docs/performance.md) — is traced
with `torch.fx`, the way torchvision's `create_feature_extractor` and timm's `_features_fx`
do: torch.nn layers, torchvision ops modules and timm's no-trace modules stay leaves, `math`
is wrapped, and a submodule whose forward cannot be traced (Python control flow on a
tensor's value, say) becomes a leaf too, found by retrying. The cut is the latest node
such that

- every node before it is exactly frozen and deterministic at training time: no trainable
  parameter, no BatchNorm or dropout-like module in training mode, no random op (dropout
  with `training=True`, `torch.rand`, `bernoulli_`, …), and
- exactly one activation crosses from the prefix to the rest; parameters and the batch size
  (`x.size(0)`, `x.shape[0]`) may be used on both sides — the suffix reads them itself.

The model is traced twice, in training and in evaluation mode (Python code that reads
`self.training` is baked into a trace), and the prefix must be the same in both; the suffix
runs the trace of the mode the model is in. Both halves share the model's own modules and
parameters, so training the suffix trains the real head and layers.

`find_cuts` lists every valid cut point of the frozen prefix (`CutPoint`, named by the last
module before it); `split_graph` cuts at the latest one or a named one, and `multi_prefix`
returns the activations at several cut points from one forward pass, each bit-identical to
that point's own prefix.
"""

from __future__ import annotations

import math
import operator
import sys
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import torch
import torchvision
from torch import fx, nn

MAX_LEAF_RETRIES = 64
RANDOM_FUNCTIONS: frozenset[Any] = frozenset({
    torch.rand, torch.rand_like, torch.randn, torch.randn_like, torch.randint,
    torch.randint_like, torch.randperm, torch.bernoulli, torch.normal, torch.multinomial,
    torch.poisson,
})
RANDOM_METHODS = frozenset({"bernoulli", "bernoulli_", "uniform_", "normal_", "random_",
                            "exponential_", "geometric_", "cauchy_", "log_normal_"})
# functions that are random (or move running statistics) only when their flag says training:
# the flag's position, and its default when the call leaves it out
MODE_FUNCTIONS: dict[Any, tuple[int, bool]] = {
    nn.functional.dropout: (2, True), nn.functional.dropout1d: (2, True),
    nn.functional.dropout2d: (2, True), nn.functional.dropout3d: (2, True),
    nn.functional.alpha_dropout: (2, False), nn.functional.feature_alpha_dropout: (2, False),
    torch.dropout: (2, True), torch.feature_dropout: (2, True),
    torch.alpha_dropout: (2, True), torch.feature_alpha_dropout: (2, True),
    torchvision.ops.stochastic_depth: (3, True), nn.functional.batch_norm: (5, False),
    nn.functional.instance_norm: (5, True),
}
MODE_DEPENDENT_MODULES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
    nn.modules.dropout._DropoutNd, torchvision.ops.StochasticDepth,
)


class UncacheableError(Exception):
    """Why a model has no cacheable prefix (it is then trained uncached)."""


@attrs.frozen
class CutPoint:
    """A place the frozen prefix can end: `position` is the crossing node's index in the
    training trace, `label` the last module the prefix runs (e.g. "layer3.4.relu")."""

    position: int
    label: str


@attrs.frozen(eq=False)
class Traces:
    """A model traced in both modes, and the cut points on which the two agree."""

    train: fx.Graph
    eval: fx.Graph
    points: tuple[CutPoint, ...]
    reason: str  # why there is no cut point, when `points` is empty

    def point(self, label: str | CutPoint | None = None) -> CutPoint:
        """The latest cut point, or the one given (a `CutPoint` of these traces, or the first
        named `label`: a module can end more than one point)."""
        if not self.points:
            raise UncacheableError(self.reason)
        if label is None:
            return self.points[-1]
        if isinstance(label, CutPoint):
            if label not in self.points:
                raise UncacheableError(f"{label} is not a cut point of this model as it is "
                                       "frozen now")
            return label
        for point in self.points:
            if point.label == label:
                return point
        raise UncacheableError(
            f"no cut point named {label!r}; the frozen prefix can end at "
            f"{', '.join(p.label for p in self.points)}")


@attrs.frozen(eq=False)
class GraphSplit:
    """A traced model cut in two. `prefix(images)` gives the one crossing activation;
    `suffix(activation)` the logits, running the training or evaluation trace as the model
    is in. `label` names the last module of the prefix; `position` the cut node's index;
    `traces` are what the cut was found on (every other cut point of the model as it is)."""

    prefix: fx.GraphModule
    suffix: Callable[[torch.Tensor], torch.Tensor]
    label: str
    position: int
    traces: Traces


class _Tracer(fx.Tracer):
    """fx tracer with leaf modules by type and by path; records which module a failure
    happened in (innermost first), so the caller can make it a leaf and retry."""

    def __init__(self, leaf_paths: set[str]) -> None:
        super().__init__(autowrap_modules=(math,), autowrap_functions=_notrace_functions())
        self.leaf_paths = leaf_paths
        self.leaf_types = _leaf_types()
        self.failed_in: list[str] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (module_qualified_name in self.leaf_paths or isinstance(m, self.leaf_types)
                or super().is_leaf_module(m, module_qualified_name))

    def call_module(self, m: nn.Module, forward: Callable[..., Any], args: tuple[Any, ...],
                    kwargs: dict[str, Any]) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            self.failed_in.append(self.path_of_module(m))
            raise


def trace(model: nn.Module, leaf_paths: set[str] | None = None) -> fx.Graph:
    """The model's forward as an fx graph, in the mode the model is in now. Submodules that
    cannot be traced become leaves (`leaf_paths` collects them across calls)."""
    leaves = leaf_paths if leaf_paths is not None else set()
    for _ in range(MAX_LEAF_RETRIES):
        tracer = _Tracer(leaves)
        try:
            return tracer.trace(model)
        except Exception as error:
            inner = next((path for path in tracer.failed_in if path), None)
            if inner is None or inner in leaves:
                raise UncacheableError(
                    f"torch.fx cannot trace {type(model).__name__}.forward "
                    f"({type(error).__name__}: {error})") from error
            leaves.add(inner)
    raise UncacheableError(f"tracing {type(model).__name__} needed over {MAX_LEAF_RETRIES} "
                           "leaf modules")


def find_cuts(model: nn.Module, training_mode: Callable[[], None],
              eval_graph: fx.Graph | None = None) -> Traces:
    """Trace `model` in both modes and find every point where an exactly-frozen prefix can
    end. `training_mode()` puts the model in the state training runs it in (the strategy's
    BatchNorm / inference-mode policy); the model is left in that state. `eval_graph`: the
    evaluation trace of this model or of a copy (it does not depend on what trains)."""
    leaves: set[str] = set()
    if eval_graph is None:
        model.eval()
        eval_graph = trace(model, leaves)
    training_mode()
    train_graph = trace(model, leaves)
    train_nodes, eval_nodes = list(train_graph.nodes), list(eval_graph.nodes)
    agree = 0
    for a, b in zip(train_nodes, eval_nodes, strict=False):
        if a.format_node() != b.format_node():
            break
        agree += 1
    positions, reason = _cut_positions(model, train_nodes[:agree])
    points = tuple(CutPoint(i, _label(train_nodes[: i + 1], train_nodes[i])) for i in positions)
    return Traces(train_graph, eval_graph, points, reason)


def split_graph(model: nn.Module, training_mode: Callable[[], None],
                at: str | CutPoint | None = None, traces: Traces | None = None) -> GraphSplit:
    """Cut `model` after its longest exactly-frozen prefix (or at the cut point `at`).
    Raises UncacheableError saying why when there is no such prefix. `traces` reuses what
    `find_cuts` found for the model in this state."""
    traces = traces or find_cuts(model, training_mode)
    point = traces.point(at)
    prefix = _prefix_module(model, traces.eval, [point.position])
    suffixes = {mode: _suffix_module(model, graph, point.position)
                for mode, graph in (("train", traces.train), ("eval", traces.eval))}
    return GraphSplit(prefix=prefix, suffix=_ModeSwitch(model, suffixes), label=point.label,
                      position=point.position, traces=traces)


def multi_prefix(model: nn.Module, traces: Traces, points: Sequence[str | CutPoint]
                 ) -> fx.GraphModule:
    """One module whose forward returns the activations at each of `points` (a tuple, in
    that order), computed in a single pass up to the deepest: what caching or probing
    features at several depths needs."""
    positions = [traces.point(point).position for point in points]
    return _prefix_module(model, traces.eval, positions)


class _ModeSwitch:
    """Runs the suffix traced in the mode the model is in (shares the model's modules)."""

    def __init__(self, model: nn.Module, suffixes: dict[str, fx.GraphModule]) -> None:
        self.model, self.suffixes = model, suffixes

    def __call__(self, activation: torch.Tensor) -> torch.Tensor:
        return self.suffixes["train" if self.model.training else "eval"](activation)


# -- finding the cut ----------------------------------------------------------------------------
def _cut_positions(model: nn.Module, nodes: list[fx.Node]) -> tuple[list[int], str]:
    """(indices of the crossing nodes of every valid cut, in forward order, "") — or ([],
    why there is none)."""
    index = {node: i for i, node in enumerate(nodes)}
    free = _free_nodes(nodes)
    last_use = {node: max((index.get(user, len(nodes)) for user in node.users), default=-1)
                for node in nodes}
    live: set[fx.Node] = set()
    found: list[int] = []
    uses_frozen_weights = False
    reason = "the first layer already trains or is random in training"
    for i, node in enumerate(nodes):
        if node.op == "output":
            continue
        if node.op != "placeholder" and node not in free:
            problem = _why_not_frozen(model, node, free)
            if problem:
                reason = f"the frozen prefix stops at {_describe(node)}: {problem}"
                break
            uses_frozen_weights = uses_frozen_weights or _uses_weights(model, node)
        if node not in free and last_use[node] > i:
            live.add(node)
        live = {n for n in live if last_use[n] > i}
        if len(live) == 1 and uses_frozen_weights:
            (crossing,) = live
            if crossing.op != "placeholder" and index[crossing] not in found[-1:]:
                found.append(index[crossing])
    else:
        reason = "every layer is frozen: there is nothing to train"
    if not found:
        if uses_frozen_weights:
            reason = ("no point of the frozen part's forward passes exactly one activation "
                      f"on ({reason})")
        return [], reason
    return found, ""


def _free_nodes(nodes: list[fx.Node]) -> set[fx.Node]:
    """Nodes the suffix can compute itself: parameters, buffers, the batch size, and
    deterministic functions of those alone."""
    free: set[fx.Node] = set()
    for node in nodes:
        if node.op == "get_attr" or _is_batch_size(node):
            free.add(node)
        elif node.op in ("call_function", "call_method") and not _is_random(node):
            inputs = node.all_input_nodes
            if inputs and all(n in free for n in inputs):
                free.add(node)
    return free


def _is_batch_size(node: fx.Node) -> bool:
    """`x.size(0)` or `x.shape[0]` of the model's input."""
    if node.op == "call_method" and node.target == "size":
        source, dims = node.args[0], node.args[1:] or (node.kwargs.get("dim"),)
        return getattr(source, "op", None) == "placeholder" and tuple(dims) == (0,)
    if node.op == "call_function" and node.target is operator.getitem and node.args[1] == 0:
        shape = node.args[0]
        return (isinstance(shape, fx.Node) and shape.op == "call_function"
                and shape.target is getattr and shape.args[1] == "shape"
                and getattr(shape.args[0], "op", None) == "placeholder")
    return False


def _is_random(node: fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in RANDOM_METHODS
    if node.op != "call_function":
        return False
    if node.target in RANDOM_FUNCTIONS:
        return True
    if node.target in MODE_FUNCTIONS:
        position, default = MODE_FUNCTIONS[node.target]
        flag = node.kwargs.get("training", node.kwargs.get("train"))
        if flag is None:
            flag = node.args[position] if len(node.args) > position else default
        return bool(flag)
    return False


def _why_not_frozen(model: nn.Module, node: fx.Node, free: set[fx.Node]) -> str:
    """Why a node would make the prefix inexact in training ("" if it would not)."""
    if _is_random(node):
        return "it draws random numbers in training"
    if node.op == "call_module":
        module = model.get_submodule(str(node.target))
        if any(p.requires_grad for p in module.parameters()):
            return "it has trainable parameters"
        for name, sub in module.named_modules():
            if sub.training and not _mode_independent(sub):
                inner = f"{node.target}.{name}" if name else str(node.target)
                return (f"{inner} ({type(sub).__name__}) runs in training mode, where its "
                        "output may change from epoch to epoch")
    for source in node.all_input_nodes:
        if source in free and _trains(model, source, free):
            return "it reads a trainable parameter"
    return ""


def _mode_independent(module: nn.Module) -> bool:
    """Torch's own layers other than normalisation and dropout compute the same in both
    modes; a layer from elsewhere in training mode might not (drop-path, say)."""
    if isinstance(module, (nn.modules.dropout._DropoutNd, torchvision.ops.StochasticDepth)):
        return module.p == 0
    if isinstance(module, MODE_DEPENDENT_MODULES):
        return False
    kind = type(module).__module__
    return kind.startswith("torch.nn.") or isinstance(module, nn.Sequential)


def _trains(model: nn.Module, node: fx.Node, free: set[fx.Node]) -> bool:
    if node.op == "get_attr":
        value = _attribute(model, str(node.target))
        return isinstance(value, nn.Parameter) and value.requires_grad
    return any(_trains(model, n, free) for n in node.all_input_nodes if n in free)


def _uses_weights(model: nn.Module, node: fx.Node) -> bool:
    if node.op == "call_module":
        return any(True for _ in model.get_submodule(str(node.target)).parameters())
    return any(n.op == "get_attr" for n in node.all_input_nodes)


def _attribute(model: nn.Module, path: str) -> Any:
    owner, _, name = path.rpartition(".")
    return getattr(model.get_submodule(owner) if owner else model, name)


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    return f"{node.name} ({getattr(node.target, '__name__', node.target)})"


def _label(prefix: list[fx.Node], crossing: fx.Node) -> str:
    """The last module the prefix runs (what `TrainState.cached_prefix` shows)."""
    modules = [str(n.target) for n in prefix if n.op == "call_module"]
    return modules[-1] if modules else crossing.name


# -- building the halves ------------------------------------------------------------------------
def _prefix_module(model: nn.Module, graph: fx.Graph, positions: Sequence[int]
                   ) -> fx.GraphModule:
    """The graph up to the deepest of `positions`, returning that crossing activation (one
    position) or the tuple of them (several)."""
    nodes = list(graph.nodes)
    out = fx.Graph()
    env: dict[fx.Node, Any] = {}
    for node in nodes[: max(positions) + 1]:
        env[node] = out.node_copy(node, lambda n: env[n])
    outputs = [env[nodes[position]] for position in positions]
    out.output(outputs[0] if len(outputs) == 1 else tuple(outputs))
    return _compiled(model, out, "FrozenPrefix")


def _suffix_module(model: nn.Module, graph: fx.Graph, position: int) -> fx.GraphModule:
    nodes = list(graph.nodes)
    crossing = nodes[position]
    out = fx.Graph()
    activation = out.placeholder("activation")
    env: dict[fx.Node, Any] = {crossing: activation}

    def bring(node: fx.Node) -> Any:
        """A prefix node the suffix needs: the activation, or recomputed (free nodes)."""
        if node not in env:
            if _is_batch_size(node):
                env[node] = out.call_method("size", (activation, 0))
            elif node.op == "placeholder":
                raise UncacheableError("the suffix would need the model's input")
            else:
                for source in node.all_input_nodes:
                    bring(source)
                env[node] = out.node_copy(node, lambda n: env[n])
        return env[node]

    for node in nodes[position + 1:]:
        for source in node.all_input_nodes:
            if source not in env:
                bring(source)
        env[node] = out.node_copy(node, lambda n: env[n])
    return _compiled(model, out, "TrainableSuffix")


def _compiled(model: nn.Module, graph: fx.Graph, name: str) -> fx.GraphModule:
    module = fx.GraphModule(model, graph, class_name=name)
    module.graph.eliminate_dead_code()
    module.recompile()
    return module


def _leaf_types() -> tuple[type[nn.Module], ...]:
    """torchvision ops modules (as torchvision's feature extraction keeps them) and, when
    timm is loaded, its registered no-trace modules."""
    ops = [m for m in vars(torchvision.ops).values()
           if isinstance(m, type) and issubclass(m, nn.Module)]
    timm_fx = sys.modules.get("timm.models._features_fx")
    if timm_fx is not None:
        ops += list(timm_fx.get_notrace_modules())
    return tuple(ops)


def _notrace_functions() -> tuple[Callable[..., Any], ...]:
    timm_fx = sys.modules.get("timm.models._features_fx")
    return tuple(timm_fx.get_notrace_functions()) if timm_fx is not None else ()
