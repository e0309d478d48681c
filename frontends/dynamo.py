"""The ``memfit`` torch.compile backend: AOTAutograd with memfit's partition hook and runtime.

``torch.compile(model, backend="memfit")`` (registered by the ``torch_dynamo_backends`` entry point)
or ``backend=memfit.backend(passes=[...])``. AOTAutograd traces the joint forward+backward graph;
memfit's partition hook turns it into a TrainGraph (parameters named by FQN from Dynamo's sources),
runs the pass pipeline on it (default ``["remat"]``: lossless recomputation), partitions it with
AOTAutograd's ``default_partition`` (which saves exactly what the rewritten backward reads, so
memfit's choices stand), and compiles forward and backward through :func:`memfit.runtime.lower.lower`,
which frees every intermediate at its last use and runs memfit ops on their kernels. The user's
loop keeps its own ``loss.backward(); opt.step()``, so passes that rewrite the update or drop
gradients (``fused_update``, ``freeze``) belong to ``memfit.optimize`` and are refused here.
``passes=[]`` hands partitioning back to AOTAutograd's min-cut partitioner.

``LAST_STATS`` holds what the hook saw and did for the most recent graph (for tests and logs).

The door tells the truth about what reached memfit. Dynamo may run a model eagerly (it refuses
``nn.RNN``/``GRU``/``LSTM`` unless ``torch._dynamo.config.allow_rnn`` is set) or split it into several
graphs at graph breaks; either way part or all of the step never sees memfit's passes. A watch on
Dynamo's compile callbacks (``torch._dynamo.callback_handler``) notices, for every frame compiled with
memfit's backend, whether Dynamo gave up on it or broke it, and warns (:class:`MemfitWarning`, once per
frame and reason) with the reason and the counts. :func:`report` runs a model once and returns the whole
count (:class:`DynamoReport`). The watch is armed when memfit's backend is looked up (the first
``backend="memfit"`` of a process), built (``memfit.backend()``) or compiles a graph, and by :func:`watch`.
``torch._dynamo.reset()`` clears Dynamo's callbacks: after it, a ``backend="memfit"`` model whose frames
never reach memfit goes unwatched until one of those happens again.
"""

from __future__ import annotations

import os
import re
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from ..errors import ConfigError, MemfitWarning, where_what_got
from ..graph import NAME_KEY, ROLE_KEY, TrainGraph, saved_activations
from ..passes.base import PIPELINES, Pass, Pipeline, make_pass
from ..runtime.lower import lower

LAST_STATS: dict[str, Any] = {}
DEFAULT_PASSES = PIPELINES["compile"]
# graphs memfit's backend compiled, graph breaks and frames run eagerly under it, since the watch was armed
# (first use of Dynamo with memfit, or the first use after torch._dynamo.reset())
TOTALS: Counter = Counter()


def fqn_from_source(source: str) -> str | None:
    """``L['self']._modules['0']._parameters['weight']`` -> ``0.weight``; None for non-parameters."""
    if "_parameters[" not in source:
        return None
    parts = re.findall(r"_(?:modules|parameters)\['([^']+)'\]", source)
    return ".".join(parts) if parts else None


def joint_train_graph(joint: fx.GraphModule, num_fwd_outputs: int, names: Sequence[str | None]) -> TrainGraph:
    """A TrainGraph view of AOTAutograd's joint graph (primals, tangents -> forward outputs, grads)."""
    from torch._guards import detect_fake_mode

    placeholders = [n for n in joint.graph.nodes if n.op == "placeholder"]
    primals = [n for n in placeholders if n.name.startswith("primals")]
    params: dict[str, fx.Node] = {}
    inputs: list[fx.Node] = []
    for i, node in enumerate(primals):
        fqn = names[i] if i < len(names) else None
        if fqn is not None:
            node.meta[ROLE_KEY], node.meta[NAME_KEY] = "param", fqn
            params[fqn] = node
        else:
            node.meta[ROLE_KEY], node.meta[NAME_KEY] = "input", f"input[{i}]"
            inputs.append(node)
    for j, node in enumerate(n for n in placeholders if n not in primals):
        node.meta[ROLE_KEY], node.meta[NAME_KEY] = "input", f"tangent[{j}]"
        inputs.append(node)
    out = next(n for n in joint.graph.nodes if n.op == "output")
    flat = list(out.args[0])
    forward_outputs = [v for v in flat[:num_fwd_outputs] if isinstance(v, fx.Node)]
    grads = flat[num_fwd_outputs:]
    grad_of = {fqn: grads[i] for i, fqn in enumerate(names[:len(primals)])
               if fqn is not None and i < len(grads) and isinstance(grads[i], fx.Node)}
    vals = [n.meta.get("val") for n in placeholders]
    g = TrainGraph(gm=joint, params=params, buffers={}, inputs=inputs, loss=forward_outputs[0], grad_of=grad_of,
                   grad_outputs=list(grad_of), buffer_updates={}, trainable=tuple(grad_of), joint=True,
                   forward_outputs=forward_outputs)
    g.fake = detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
    return g


def _joint_passes(passes: Sequence[Any] | None) -> list[Pass]:
    made = [make_pass(p) for p in (DEFAULT_PASSES if passes is None else passes)]
    refused = [p.name for p in made if not p.joint_ok]
    if refused:
        raise ConfigError(where_what_got(
            "memfit.backend(passes=)", "passes that keep the joint graph's outputs (e.g. 'remat')", refused,
            "fused_update/freeze change the optimizer step; use memfit.optimize for them"))
    return made


def backend(budget: Any = None, passes: Sequence[Any] | None = None) -> MemfitCompiler:
    """A torch.compile backend: memfit passes on the joint graph, lowered through memfit's runtime.

    Returns a :class:`MemfitCompiler`, which counts the graphs it compiled (``.graphs``)."""
    if budget is not None:
        raise ConfigError(where_what_got(
            "memfit.backend", "no budget (the torch.compile door has no planner yet)", f"budget={budget!r}",
            "use memfit.optimize(model, budget=...) for a budgeted step"))
    compiler = MemfitCompiler(_joint_passes(passes))
    watch()
    return compiler


class MemfitCompiler:
    """memfit's torch.compile backend (``backend=memfit.backend(...)``); ``graphs`` counts the graphs it
    compiled, ``break_reasons`` why Dynamo ended each of them early (a graph break), if it did."""

    __name__ = "memfit"

    def __init__(self, passes: list[Pass]):
        self.passes = passes
        self.graphs = 0
        self.break_reasons: list[str] = []

    def __repr__(self) -> str:
        return f"MemfitCompiler(passes={[p.name for p in self.passes]}, graphs={self.graphs})"

    def __call__(self, gm: fx.GraphModule, example_inputs: list[torch.Tensor]):
        from torch._dynamo.backends.common import aot_autograd
        from torch._functorch.partitioners import default_partition, min_cut_rematerialization_partition

        watch()  # re-armed here too: torch._dynamo.reset() clears Dynamo's callbacks
        pass_list = self.passes
        device = next((t.device for t in example_inputs if isinstance(t, torch.Tensor)), torch.device("cpu"))
        names = []
        for n in gm.graph.nodes:
            if n.op == "placeholder":
                arg = n.meta.get("grapharg")
                names.append(fqn_from_source(arg.source.name) if arg is not None and arg.source is not None
                             else None)

        def partition(joint: fx.GraphModule, joint_inputs, *, num_fwd_outputs: int, **kwargs):
            LAST_STATS.clear()
            LAST_STATS["joint_ops"] = sum(1 for n in joint.graph.nodes if n.op == "call_function")
            if not pass_list:
                return min_cut_rematerialization_partition(joint, joint_inputs, num_fwd_outputs=num_fwd_outputs,
                                                           **kwargs)
            g = joint_train_graph(joint, num_fwd_outputs, names)
            LAST_STATS["saved_bytes_before"] = sum(saved_activations(g).values())
            g = Pipeline(pass_list)(g)
            LAST_STATS["saved_bytes_after"] = sum(saved_activations(g).values())
            LAST_STATS["passes"] = list(g.applied)
            LAST_STATS["pass_stats"] = g.info.get("pass_stats", {})
            LAST_STATS["params"] = list(g.params)
            return default_partition(g.gm, joint_inputs, num_fwd_outputs=num_fwd_outputs, **kwargs)

        def compile_graph(graph: fx.GraphModule, inputs: list[torch.Tensor]):
            return lower(graph, device).fn

        compiled = aot_autograd(fw_compiler=compile_graph, bw_compiler=compile_graph,
                                inference_compiler=compile_graph, partition_fn=partition)(gm, example_inputs)
        self.graphs += 1
        TOTALS["memfit_graphs"] += 1
        reason = getattr(gm, "compile_subgraph_reason", None)
        if reason is not None and getattr(reason, "graph_break", False):
            self.break_reasons.append(_first_lines(str(reason.reason)))
        return compiled


_DEFAULT: MemfitCompiler | None = None


def _memfit_backend(gm: fx.GraphModule, example_inputs: list[torch.Tensor]):
    """Entry point for ``torch.compile(model, backend="memfit")`` (one shared default compiler)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = backend()
    return _DEFAULT(gm, example_inputs)


_memfit_backend.__name__ = _memfit_backend.__qualname__ = "memfit_backend"


def __getattr__(name: str) -> Any:
    # ``memfit_backend`` is served here rather than defined at module level so that torch.compile's first
    # lookup of backend="memfit" (the entry point loads this attribute) arms the watch: until then
    # torch._dynamo may not be imported, and importing it with memfit would cost seconds.
    if name == "memfit_backend":
        watch()
        return _memfit_backend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _innermost(fn: Any) -> Any:
    """The user's backend inside Dynamo's wrappers (CatchErrorsWrapper -> ConvertFrame -> WrapBackendDebug
    -> torch.compile's _TorchCompileWrapper, whose ``compiler_fn`` it is)."""
    for _ in range(16):
        inner = getattr(fn, "_torchdynamo_orig_backend", None)
        if inner is None:
            inner = getattr(fn, "compiler_fn", None)
        if inner is None or not callable(inner):
            break
        fn = inner
    return fn


def _is_memfit(fn: Any) -> bool:
    """Whether a backend (as torch.compile or torch._dynamo.optimize stores it) is memfit's."""
    fn = _innermost(fn)
    return fn is _memfit_backend or isinstance(fn, MemfitCompiler)


# ---- the watch: Dynamo's compile callbacks, for frames compiled with memfit's backend ------------------

_WATCHED = ("frames", "graph_break", "unimplemented")
_OPEN: dict[str, tuple[Any, dict[str, Counter], int]] = {}  # compile id -> (code, counters, memfit graphs)
_WARNED: set[tuple[str, tuple[str, ...]]] = set()


def watch() -> None:
    """Arm the watch (idempotent). Done on import and whenever memfit's backend is built or compiles;
    call it after ``torch._dynamo.reset()`` (which drops Dynamo's callbacks) to watch a
    ``backend="memfit"`` model whose first frame memfit's backend never sees."""
    import torch._dynamo

    handler = getattr(torch._dynamo, "callback_handler", None)
    if handler is None or not hasattr(handler, "register_start_callback"):
        return
    if _on_compile_start in handler.start_callbacks:
        return
    _OPEN.clear()
    _WARNED.clear()  # a fresh Dynamo (first use, or reset): what was said before may be said again
    TOTALS.clear()
    handler.register_start_callback(_on_compile_start)
    handler.register_end_callback(_on_compile_end)


def _counters() -> dict[str, Counter]:
    from torch._dynamo.utils import counters

    return {k: Counter(counters.get(k, {})) for k in _WATCHED}


def _compile_in_progress() -> tuple[Any, Any] | None:
    """(backend, code object) of the frame Dynamo is compiling, read from its ``_compile`` frame."""
    f = sys._getframe(2)
    for _ in range(100):
        if f is None:
            return None
        if f.f_code.co_name == "_compile" and f.f_code.co_filename.endswith("convert_frame.py"):
            loc = f.f_locals
            if "compiler_fn" in loc:
                return loc["compiler_fn"], loc.get("code")
        f = f.f_back
    return None


def _on_compile_start(args: Any) -> None:
    try:
        if getattr(getattr(args, "callback_trigger", None), "name", "DYNAMO") != "DYNAMO":
            return
        found = _compile_in_progress()
        if found is None or not _is_memfit(found[0]):
            return
        _OPEN[str(args.compile_id)] = (found[1], _counters(), TOTALS["memfit_graphs"])
    except Exception:  # a diagnostic must never break the user's compile
        return


def _on_compile_end(args: Any) -> None:
    try:
        opened = _OPEN.pop(str(getattr(args, "compile_id", "")), None)
        if opened is None:
            return
        code, before, graphs_before = opened
        message = _frame_verdict(code, before, _counters(), TOTALS["memfit_graphs"] - graphs_before)
    except Exception:
        return
    if message is not None:
        warnings.warn_explicit(message, MemfitWarning, *_where(code))


def _where(code: Any) -> tuple[str, int]:
    return (getattr(code, "co_filename", "<unknown>"), getattr(code, "co_firstlineno", 0) or 0)


def _frame_name(code: Any) -> str:
    if code is None:
        return "a frame"
    name = code.co_name
    m = re.match(r"torch_dynamo_resume_in_(\w+)_at_(\d+)$", name)
    if m:
        name = f"{m.group(1)} (after line {m.group(2)})"
    return f"{name} ({os.path.basename(code.co_filename)}:{code.co_firstlineno})"


def _first_lines(reason: str) -> str:
    """The gist of a Dynamo reason: what and why (its first line and explanation), without the hints."""
    lines = [ln.strip() for ln in reason.strip().splitlines() if ln.strip()]
    if not lines:
        return reason.strip()
    if len(lines) > 1 and lines[1].startswith("Explanation:"):
        return f"{lines[0].rstrip('.')}: {lines[1][len('Explanation:'):].strip().rstrip('.')}"
    return lines[0].rstrip(".")


def _new(before: Counter, after: Counter) -> list[str]:
    return [k for k, v in after.items() if v > before.get(k, 0)]


def _hint(reasons: Sequence[str], *, point_to_report: bool = True) -> str:
    text = " ".join(reasons)
    hints = []
    if "RNN, GRU, or LSTM" in text and not torch._dynamo.config.allow_rnn:
        hints.append("set torch._dynamo.config.allow_rnn = True (Dynamo's experimental RNN support) before the "
                     "first call, or train with memfit.optimize(...), which captures nn.LSTM as one graph")
    if "capture_scalar_outputs" in text and not torch._dynamo.config.capture_scalar_outputs:
        hints.append("set torch._dynamo.config.capture_scalar_outputs = True to keep .item() in the graph")
    if point_to_report:
        hints.append("memfit.frontends.dynamo.report(compiled, *example_args) counts graphs and breaks for the "
                     "whole model")
    return "; ".join(hints) or "see torch._dynamo.explain for Dynamo's view"


def _frame_verdict(code: Any, before: dict[str, Counter], after: dict[str, Counter], graphs: int) -> str | None:
    """The warning for one frame compiled with memfit's backend, or None when memfit got all of it.

    Read at the end of the frame's compile: graphs memfit compiled during it, graph breaks and reasons
    Dynamo counted (``counters["graph_break"]``, ``counters["unimplemented"]``) meanwhile."""
    breaks = sum(after["graph_break"].values()) - sum(before["graph_break"].values())
    break_reasons = _new(before["graph_break"], after["graph_break"])
    unsupported = [r for r in _new(before["unimplemented"], after["unimplemented"]) if r not in break_reasons]
    where = _frame_name(code)
    TOTALS["graph_breaks"] += max(breaks, 0)
    if graphs == 0 and (unsupported or break_reasons):
        reasons = [_first_lines(r) for r in unsupported + break_reasons]
        TOTALS["eager_frames"] += 1
        _EAGER[_code_key(code)] = reasons
        key = (where, tuple(reasons))
        if key in _WARNED:
            return None
        _WARNED.add(key)
        resumed = " up to its graph break (Dynamo traces what follows as a new frame)" if breaks > 0 else ""
        return (f"memfit: torch.compile ran {where} eagerly{resumed}: Dynamo could not trace it, so memfit's backend "
                f"compiled no graph of it and none of memfit's passes apply there (memfit's backend so far: "
                f"{TOTALS['memfit_graphs']} graph(s) compiled, {TOTALS['graph_breaks']} graph break(s), "
                f"{TOTALS['eager_frames']} frame(s) run eagerly). Reason: {' | '.join(reasons)}. "
                f"Hint: {_hint(reasons)}.")
    if breaks > 0:
        reasons = [_first_lines(r) for r in break_reasons] or ["(no reason recorded)"]
        key = (where, tuple(reasons))
        if key in _WARNED:
            return None
        _WARNED.add(key)
        return (f"memfit: torch.compile split {where} at {breaks} graph break(s): memfit compiled {graphs} graph(s) "
                f"of it up to the break; the code at the break runs eagerly, outside memfit's passes, and what follows "
                f"is traced as a new frame (memfit's backend so far: {TOTALS['memfit_graphs']} graph(s) compiled, "
                f"{TOTALS['graph_breaks']} graph break(s), {TOTALS['eager_frames']} frame(s) run eagerly). "
                f"Break reason: {' | '.join(reasons)}. Hint: {_hint(reasons)}.")
    return None


_EAGER: dict[tuple[str, int, str], list[str]] = {}  # frames Dynamo gave up on -> why (it never retries them)


def _code_key(code: Any) -> tuple[str, int, str]:
    return (getattr(code, "co_filename", ""), getattr(code, "co_firstlineno", 0), getattr(code, "co_name", ""))


# ---- report: one run, the whole count ---------------------------------------------------------------


@dataclass(frozen=True)
class DynamoReport:
    """What torch.compile handed to memfit for one call of a model.

    ``graphs``: graphs Dynamo captured (each one is handed to the backend); ``memfit_graphs``: those memfit's
    backend compiled; ``graph_breaks`` and ``break_reasons``: where and why Dynamo split the code;
    ``eager_frames`` and ``eager_reasons``: frames Dynamo gave up on, which run eagerly; ``backend``: the
    compiled object's backend (memfit's, or another)."""

    graphs: int
    graph_breaks: int
    break_reasons: tuple[str, ...]
    memfit_graphs: int
    eager_frames: int = 0
    eager_reasons: tuple[str, ...] = ()
    backend: str = "memfit"

    @property
    def whole(self) -> bool:
        """memfit compiled the model as one graph: nothing ran eagerly and nothing was split."""
        return self.memfit_graphs >= 1 and self.graph_breaks == 0 and self.eager_frames == 0

    def __str__(self) -> str:
        lines = [f"torch.compile with backend {self.backend}: {self.graphs} graph(s), {self.memfit_graphs} compiled "
                 f"by memfit, {self.graph_breaks} graph break(s), {self.eager_frames} frame(s) run eagerly"]
        lines += [f"  break: {r}" for r in self.break_reasons]
        lines += [f"  eager: {r}" for r in self.eager_reasons]
        return "\n".join(lines)


def _unwrap(compiled: Any) -> tuple[Callable, Any]:
    """(the original callable, its torch.compile backend or None) of a compiled module or function."""
    from torch._dynamo import eval_frame

    if isinstance(compiled, eval_frame.OptimizedModule):
        return compiled._orig_mod, getattr(compiled.dynamo_ctx, "callback", None)
    orig = getattr(compiled, "_torchdynamo_orig_callable", None)
    if orig is None:
        return compiled, None
    context = getattr(eval_frame, "_TorchDynamoContext", ())
    for cell in getattr(compiled, "__closure__", None) or ():  # torch.compile(fn) closes over its context
        try:
            ctx = cell.cell_contents
        except ValueError:
            continue
        if isinstance(ctx, context):
            return orig, getattr(ctx, "callback", None)
    return orig, None


def report(compiled: Any, *example_args: Any, warn: bool = True, **example_kwargs: Any) -> DynamoReport:
    """Compile ``compiled``'s model afresh with memfit's backend, run it once on the example inputs and
    count what reached memfit: a :class:`DynamoReport`. Warns (:class:`MemfitWarning`) when memfit compiled
    no graph, Dynamo broke the model into several graphs or ran part of it eagerly.

    ``compiled`` is what ``torch.compile(model, backend="memfit")`` (or ``backend=memfit.backend(...)``)
    returned, or a plain module or function (then memfit's default backend is used). The run is real, like
    ``torch._dynamo.explain``'s: BatchNorm statistics update. A frame Dynamo gave up on before is not retried
    (until ``torch._dynamo.reset()``); its reason is the one recorded when it happened.
    """
    orig, callback = _unwrap(compiled)
    inner = _innermost(callback) if callback is not None else None
    if callback is not None and not _is_memfit(callback):
        compiler: Any = None
        name = getattr(inner, "__name__", type(inner).__name__)
    else:
        # a fresh compiler with the same passes: the user's compiler keeps counting only the user's graphs
        compiler = MemfitCompiler(inner.passes) if isinstance(inner, MemfitCompiler) else backend()
        name = "memfit"
    seen: list[fx.GraphModule] = []
    done = [0]

    def counting(gm: fx.GraphModule, example_inputs: list[torch.Tensor]):
        seen.append(gm)
        if compiler is None:
            return gm.forward
        out = compiler(gm, example_inputs)
        done[0] += 1
        return out

    before = _counters()
    torch.compile(orig, backend=counting)(*example_args, **example_kwargs)
    after = _counters()
    break_reasons = [_first_lines(r) for r in _new(before["graph_break"], after["graph_break"])]
    breaks = sum(after["graph_break"].values()) - sum(before["graph_break"].values())
    unsupported = [_first_lines(r) for r in _new(before["unimplemented"], after["unimplemented"])]
    unsupported = [r for r in unsupported if r not in break_reasons]
    failed = (after["frames"]["total"] - before["frames"]["total"]) - (after["frames"]["ok"] - before["frames"]["ok"])
    eager = failed if unsupported else 0  # frames Dynamo left for a benign reason (nothing to trace) do not count
    if not seen and after["frames"]["total"] == before["frames"]["total"]:
        code = getattr(getattr(orig, "forward", orig), "__code__", None)
        recorded = _EAGER.get(_code_key(code))
        if recorded:  # Dynamo gave up on this code before and does not try it again
            eager, unsupported = 1, list(recorded)
    rep = DynamoReport(graphs=len(seen), graph_breaks=breaks, break_reasons=tuple(break_reasons),
                       memfit_graphs=done[0], eager_frames=eager, eager_reasons=tuple(unsupported), backend=name)
    if unsupported and not seen:
        _EAGER[_code_key(getattr(getattr(orig, "forward", orig), "__code__", None))] = list(unsupported)
    if warn and not rep.whole:
        why = list(rep.eager_reasons) + list(rep.break_reasons)
        if compiler is None:
            what = f"was compiled with backend {name}, not memfit's: memfit compiled nothing"
        elif rep.memfit_graphs == 0:
            what = "ran eagerly: memfit compiled no graph of it"
        else:
            what = (f"reached memfit as {rep.memfit_graphs} graph(s) with {rep.graph_breaks} graph break(s); "
                    f"the code at each break runs eagerly, outside memfit's passes")
        label = getattr(orig, "__qualname__", type(orig).__name__)
        warnings.warn(f"memfit: torch.compile of {label} {what} ({rep.graphs} graph(s), {rep.memfit_graphs} compiled "
                      f"by memfit, {rep.graph_breaks} graph break(s), {rep.eager_frames} frame(s) run eagerly). "
                      f"Reasons: {' | '.join(why) or 'none recorded'}. Hint: {_hint(why, point_to_report=False)}.",
                      MemfitWarning, stacklevel=2)
    return rep


if "torch._dynamo" in sys.modules:  # cheap only when Dynamo is there already; else armed on first use
    watch()
