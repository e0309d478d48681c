"""Whole-step capture: model + loss -> TrainGraph, through ``aot_export_module(trace_joint=True)``.

The model and its loss are wrapped in one module whose only output is the scalar loss; AOTAutograd
traces forward and backward together into one functional ATen graph and hands back a
GraphSignature, from which every placeholder and output is named by FQN (never by position).

Batch convention (documented in README): with ``loss_fn=None`` the model is called on the whole
batch and must return the loss (a 0-dim tensor, a tuple/list whose first item is, or an object/dict
with ``.loss``/``["loss"]``, as Hugging Face models do when given ``labels``); with ``loss_fn`` the
model is called on ``batch[:-1]`` and the loss is ``loss_fn(output, batch[-1])``. A batch that is a
single dict is passed as keyword arguments.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.nn.utils.stateless import _reparametrize_module

from ..errors import ConfigError, UnsupportedGraph, where_what_got
from ..graph import NAME_KEY, ROLE_KEY, TrainGraph, user_frame

_PREFIX = "model."


def extract_loss(output: Any, where: str = "memfit.capture") -> torch.Tensor:
    """The scalar loss inside a model's output, or a ConfigError saying what was found."""
    candidate = output
    if isinstance(output, dict) or hasattr(output, "keys"):
        candidate = output.get("loss") if hasattr(output, "get") else None
    elif hasattr(output, "loss"):
        candidate = output.loss
    elif isinstance(output, (tuple, list)) and output:
        candidate = output[0]
    if isinstance(candidate, torch.Tensor) and candidate.dim() == 0 and candidate.is_floating_point():
        return candidate
    got = type(output).__name__
    if isinstance(output, torch.Tensor):
        got = f"a tensor of shape {tuple(output.shape)}"
    elif hasattr(output, "keys"):
        got = f"{type(output).__name__} with keys {list(output.keys())}"
    raise ConfigError(where_what_got(
        where, "the model to return a scalar loss (0-dim float tensor, or .loss / ['loss'] / first item)",
        got, "pass loss_fn=... (called as loss_fn(output, batch[-1])) or make the model return its loss"))


class _StepModule(nn.Module):
    """model + loss as one module returning ``(loss,)``; batch given as flat positional tensors."""

    def __init__(self, model: nn.Module, loss_fn: Callable | None, dict_keys: tuple[str, ...] | None):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn
        self.dict_keys = dict_keys
        self.ties = tied_names(model)

    # A tensor registered under several names (tied weights) is one parameter of the step: AOTAutograd sees
    # it once, under its first name, and the forward re-ties the other names to it. Exported name by name,
    # a second name the forward never reads (BERT's cls.predictions.bias, T5's shared.weight) would get no
    # gradient and fail the export.
    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        return super().named_parameters(prefix, recurse, remove_duplicate=True)

    def named_buffers(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        return super().named_buffers(prefix, recurse, remove_duplicate=True)

    def forward(self, *flat):
        if not self.ties:
            return self._step(*flat)
        current = {dup: _attr(self.model, canon) for dup, (canon, _) in self.ties.items()}
        with _reparametrize_module(self.model, current):
            return self._step(*flat)

    def _step(self, *flat):
        if self.dict_keys is not None:
            batch = dict(zip(self.dict_keys, flat, strict=True))
            if self.loss_fn is not None:
                raise ConfigError(where_what_got("memfit.capture", "a positional batch when loss_fn is given",
                                                 "a dict batch", "drop loss_fn or pass (inputs..., target)"))
            return (_checked_grad(extract_loss(self.model(**batch))),)
        if self.loss_fn is None:
            return (_checked_grad(extract_loss(self.model(*flat))),)
        if len(flat) < 2:
            raise ConfigError(where_what_got("memfit.capture", "a batch (inputs..., target) when loss_fn is given",
                                             f"{len(flat)} tensor(s)", "pass the target as the batch's last item"))
        out = self.model(*flat[:-1])
        loss = self.loss_fn(out, flat[-1])
        if not (isinstance(loss, torch.Tensor) and loss.dim() == 0):
            got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ConfigError(where_what_got("memfit.capture: loss_fn", "a 0-dim tensor", got,
                                             "reduce the loss (e.g. .mean()) inside loss_fn"))
        return (_checked_grad(loss),)


def _checked_grad(loss: torch.Tensor) -> torch.Tensor:
    if not loss.requires_grad:
        raise ConfigError(where_what_got(
            "memfit.capture", "a loss that depends on a trainable parameter", "a loss with requires_grad=False",
            "the loss (or the output it is computed from) is detached, computed under torch.no_grad(), or "
            "reads only frozen parameters: remove the .detach()/no_grad, or unfreeze what should train"))
    return loss


# (kind, patterns in the error text, hint). The first match classifies a capture failure.
_CAPTURE_FAILURES = (
    ("data-dependent branch", ("DataDependentOutputException", "data-dependent", "GuardOnDataDependentSymNode",
                               "_local_scalar_dense", "Could not guard on data-dependent"),
     "the model reads a tensor's value in Python (if x.any(): ..., int(t.item()), a loop over a tensor): "
     "one graph cannot take both branches; compute both sides and select with torch.where, or move the "
     "decision out of the step (pass it as a setting)"),
    ("wrong inputs", ("positional argument", "unexpected keyword argument", "required positional argument",
                      "required keyword-only argument"),
     "example_inputs do not match the model's forward: with loss_fn the model gets batch[:-1] and "
     "loss_fn(output, batch[-1]); without it the model gets the whole batch (one dict -> keywords)"),
    ("parameter mutation", ("received a mutation", "mutation on a leaf", "a leaf Variable that requires grad"),
     "the forward edits a parameter in place (e.g. weight.mul_(...)): memfit owns the updates; move the edit "
     "out of forward, or make it out of place (w = w * s)"),
    ("loss without grad", ("does not require gradients", "does not require grad"),
     "the loss does not depend on a trainable parameter: remove a .detach()/torch.no_grad() on its path"),
)


def classify_capture_error(e: BaseException) -> UnsupportedGraph | ConfigError:
    """A capture failure as a memfit error: its kind, the hint for that kind and the model source line."""
    text = f"{type(e).__name__}: {e}"
    cause = e.__cause__
    while cause is not None:
        text += f" | {type(cause).__name__}: {cause}"
        cause = cause.__cause__
    kind, hint = "unsupported op or construct", ("report the model with the line above, or keep that code out "
                                                 "of the training step")
    for k, patterns, h in _CAPTURE_FAILURES:
        if any(p in text for p in patterns):
            kind, hint = k, h
            break
    where = model_frame(e)
    first = str(e).splitlines()[0] if str(e) else ""
    msg = where_what_got(f"memfit.capture ({kind}{', at ' + where if where else ''})", "a traceable training step",
                         f"{type(e).__name__}: {first}", hint)
    return ConfigError(msg) if kind == "wrong inputs" else UnsupportedGraph(msg)


def model_frame(e: BaseException) -> str | None:
    """The innermost traceback frame of ``e`` (or its causes) in model code: not torch, not memfit's own
    package, not the standard library; ``"file:line: code"``."""
    import os
    import sysconfig
    import traceback

    pkg = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    user_dirs = tuple(os.path.join(pkg, d) + os.sep for d in ("tests", "examples", "bench"))
    torch_dir = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep
    stdlib = sysconfig.get_paths()["stdlib"] + os.sep
    best = None
    chain, seen = [], set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for exc in reversed(chain):
        for fr in traceback.extract_tb(exc.__traceback__):
            f = os.path.abspath(fr.filename)
            if f.startswith(torch_dir) or f.startswith(stdlib) or "<" in fr.filename:
                continue
            if f.startswith(pkg + os.sep) and not f.startswith(user_dirs):
                continue
            best = f"{fr.filename}:{fr.lineno}: {(fr.line or '').strip()}"
    return best


def _attr(module: nn.Module, fqn: str):
    for part in fqn.split("."):
        module = getattr(module, part)
    return module


def tied_names(model: nn.Module) -> dict[str, tuple[str, str]]:
    """Every second (third...) name of a tensor the model registers under several names:
    ``{name: (first name, "param" | "buffer")}``, in ``named_parameters`` order."""
    first: dict[int, str] = {}
    ties: dict[str, tuple[str, str]] = {}
    for kind, named in (("param", model.named_parameters(remove_duplicate=False)),
                        ("buffer", model.named_buffers(remove_duplicate=False))):
        for name, t in named:
            canon = first.setdefault(id(t), name)
            if canon != name:
                ties[name] = (canon, kind)
    return ties


def flatten_batch(batch: Sequence[Any], where: str = "memfit"
                  ) -> tuple[tuple[torch.Tensor, ...], tuple[str, ...] | None]:
    """A batch as flat tensors plus the dict keys when the batch is one dict."""
    if len(batch) == 1 and isinstance(batch[0], dict):
        keys = tuple(batch[0].keys())
        values = tuple(batch[0][k] for k in keys)
    else:
        keys, values = None, tuple(batch)
    for i, v in enumerate(values):
        if not isinstance(v, torch.Tensor):
            name = keys[i] if keys else f"batch[{i}]"
            raise ConfigError(where_what_got(where, f"{name} to be a tensor", type(v).__name__,
                                             "pass tensors only (non-tensor settings belong in the model)"))
    return values, keys


def capture(model: nn.Module, example_inputs: Sequence[Any], loss_fn: Callable | None = None) -> TrainGraph:
    """Trace one whole training step of ``model`` into a TrainGraph (forward + backward, no update yet)."""
    from torch._functorch.aot_autograd import aot_export_module

    if not isinstance(model, nn.Module):
        raise ConfigError(where_what_got("memfit.capture", "an nn.Module", type(model).__name__,
                                         "wrap your function in an nn.Module"))
    flat, keys = flatten_batch(example_inputs, "memfit.capture: example_inputs")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ConfigError(where_what_got("memfit.capture", "at least one parameter with requires_grad=True",
                                         "none", "unfreeze something to train"))
    wrapper = _StepModule(model, loss_fn, keys)
    mode, fakes, fake_inputs = _fake_world(wrapper, flat)
    try:
        with _reparametrize_module(wrapper, fakes, tie_weights=True), export_mode():
            gm, sig = _export_joint(wrapper, fake_inputs) if _DIRECT_JOINT else \
                aot_export_module(wrapper, fake_inputs, trace_joint=True, output_loss_index=0)
    except ConfigError:
        raise
    except Exception as e:  # surface the model's own error, with where it came from
        cause = e
        while cause.__cause__ is not None and not isinstance(cause, ConfigError):
            cause = cause.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        err = classify_capture_error(e)
        if "(parameter mutation)" in str(err):
            line = locate_param_mutation(model, example_inputs, loss_fn)
            if line:
                err = type(err)(str(err).replace("(parameter mutation)", f"(parameter mutation, at {line})", 1))
        raise err from e
    tg = _to_train_graph(gm, sig, trainable)
    tg.fake = mode
    _record_tied(tg, model)
    return tg


_DIRECT_JOINT = os.environ.get("MEMFIT_CAPTURE_RETRACE", "0") != "1"  # 1: torch's own (slower) export path


def _export_joint(mod: nn.Module, args: tuple) -> tuple[fx.GraphModule, Any]:
    """``aot_export_module(mod, args, trace_joint=True, output_loss_index=0)`` in one trace instead of two.

    torch traces the joint graph, then traces that graph again only to drop its (unused) tangent inputs
    and flatten its (forward outputs, per-input gradients) output; here those two edits are made on the
    graph itself: the same ops in the same order, the same GraphSignature (built by torch from the edited
    graph). Capture of a 2-layer llama-7b-width step falls from ~1.6 s to ~1.1 s. A torch whose private
    export API differs falls back to ``aot_export_module`` (``MEMFIT_CAPTURE_RETRACE=1`` forces that)."""
    import torch.utils._pytree as pytree
    from torch._functorch import aot_autograd as aot

    try:
        export_fn, functional, signature = aot._aot_export_function, aot.create_functional_call, \
            aot.create_graph_signature
    except AttributeError:
        return aot.aot_export_module(mod, args, trace_joint=True, output_loss_index=0)
    named_params = dict(mod.named_parameters(remove_duplicate=False))
    named_buffers = dict(mod.named_buffers(remove_duplicate=False))
    flat, spec = pytree.tree_flatten({**named_params, **named_buffers})
    call = functional(mod, spec, len(flat), store_orig_mod=True)
    outs: list[int] = []

    def step(*a: Any) -> Any:
        out = call(*a)
        out = (out,) if isinstance(out, torch.Tensor) else tuple(out)
        outs.append(len(out))
        return out

    full = (*flat, *args)
    gm, meta, in_spec, out_spec = export_fn(step, full, num_params_buffers=len(flat), no_tangents=True,
                                            trace_joint=True)
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    out_node = next(n for n in reversed(graph.nodes) if n.op == "output")
    values = list(out_node.args[0])
    n_out = outs[0]
    if len(placeholders) < len(full) or len(values) != n_out + len(full) or \
            any(t.users for t in placeholders[len(full):]):
        return aot.aot_export_module(mod, args, trace_joint=True, output_loss_index=0)
    for t in placeholders[len(full):]:  # tangents: the loss is backpropagated from a constant 1
        graph.erase_node(t)
    grads = [g for a, g in zip(full, values[n_out:], strict=True)
             if isinstance(a, torch.Tensor) and a.requires_grad]
    if any(g is None for g in grads):
        return aot.aot_export_module(mod, args, trace_joint=True, output_loss_index=0)
    out_node.args = (tuple(values[:n_out] + grads),)
    graph._codegen = fx.graph.CodeGen()
    gm.recompile()
    sig = signature(gm, meta, in_spec, out_spec, user_args_flat=list(pytree.arg_tree_leaves(*args)),
                    params_and_buffers_flat=list(flat), param_names=list(named_params),
                    buffer_names=list(named_buffers), trace_joint=True, num_user_fw_outs=n_out, loss_index=0)
    return gm, sig


@contextlib.contextmanager
def export_mode():
    """Tell model code that it is being traced, as ``torch.export`` does (``torch.compiler.is_compiling()``
    is True inside), so libraries take their trace-safe branches instead of reading tensor values.

    Hugging Face models, for one, decide whether an attention mask can be dropped by asking
    ``padding_mask.all()``: a data-dependent Python branch that no graph can capture. Under this mode
    they always build the full mask, which is correct for every batch the Trainer will see (padded or
    not), so the captured graph needs no guard on input values.
    """
    import torch.compiler as tc

    if not hasattr(tc, "_is_compiling_flag"):  # a torch without the flag: model code takes its eager branches
        yield
        return
    before = tc._is_compiling_flag
    tc._is_compiling_flag = True
    try:
        yield
    finally:
        tc._is_compiling_flag = before


def _fake_world(wrapper: nn.Module, flat: Sequence[torch.Tensor]):
    """FakeTensors for every parameter, buffer and input: capture traces shapes, allocates nothing.

    Tied tensors map to one fake tensor, so AOTAutograd sees the tie. Tensors the model creates while
    running (``torch.arange`` positions, constants) are converted by the mode (allow_non_fake_inputs).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    memo: dict[int, torch.Tensor] = {}
    fakes: dict[str, torch.Tensor] = {}
    named = [*nn.Module.named_parameters(wrapper, remove_duplicate=False),
             *nn.Module.named_buffers(wrapper, remove_duplicate=False)]
    for name, t in named:
        if id(t) not in memo:
            memo[id(t)] = _to_fake(mode, t)
        fakes[name] = memo[id(t)]
    fake_inputs = tuple(_to_fake(mode, t) for t in flat)
    return mode, fakes, fake_inputs


def _to_fake(mode, t: torch.Tensor) -> torch.Tensor:
    """A FakeTensor of ``t``; a ``meta`` tensor (a model planned without allocating) becomes a CPU fake,
    so the trace takes the same kernels (SDPA, decompositions) as a CPU run would."""
    if t.device.type != "meta":
        return mode.from_tensor(t, static_shapes=True)
    fake = mode.fake_tensor_converter.from_meta_and_device(mode, t, torch.device("cpu"))
    if t.requires_grad:
        fake.requires_grad_(True)
    return fake


def _strip(fqn: str) -> str:
    return fqn[len(_PREFIX):] if fqn.startswith(_PREFIX) else fqn


def _to_train_graph(gm: fx.GraphModule, sig, trainable: list[str]) -> TrainGraph:
    nodes = {n.name: n for n in gm.graph.nodes}
    params: dict[str, fx.Node] = {}
    buffers: dict[str, fx.Node] = {}
    inputs: list[fx.Node] = []
    for name, fqn in sig.inputs_to_parameters.items():
        params[_strip(fqn)] = nodes[name]
    for name, fqn in sig.inputs_to_buffers.items():
        buffers[_strip(fqn)] = nodes[name]
    for name in sig.user_inputs:
        inputs.append(nodes[name])
    for fqn, n in params.items():
        n.meta[ROLE_KEY], n.meta[NAME_KEY] = "param", fqn
    for fqn, n in buffers.items():
        n.meta[ROLE_KEY], n.meta[NAME_KEY] = "buffer", fqn
    for i, n in enumerate(inputs):
        n.meta[ROLE_KEY], n.meta[NAME_KEY] = "input", f"batch[{i}]"

    out_node = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    outs = {getattr(a, "name", None): a for a in out_node.args[0]}
    # The step's only user output is the loss. (GraphSignature.backward_signature.loss_output is not
    # offset by the buffer mutations in torch 2.13: with BatchNorm it names running_mean.)
    loss = outs[sig.user_outputs[0]]
    grad_of = {_strip(fqn): outs[name] for name, fqn in sig.backward_signature.gradients_to_parameters.items()}
    buffer_updates = {_strip(fqn): outs[name] for name, fqn in sig.buffers_to_mutate.items()}
    order = list(params)
    tg = TrainGraph(gm=gm, params=params, buffers=buffers, inputs=inputs, loss=loss,
                    grad_of=grad_of, grad_outputs=[p for p in order if p in grad_of],
                    buffer_updates=buffer_updates, trainable=tuple(p for p in order if p in grad_of))
    missing = [p for p in trainable if p not in grad_of]
    tg.info["capture"] = {"no_grad_params": missing}
    tg.sync_outputs()
    tg.graph.lint()
    tg.recompile()
    return tg


def _record_tied(tg: TrainGraph, model: nn.Module) -> None:
    """Record each tied parameter's other names (``tg.tied[name] = first name``).

    The step sees a tied tensor once, under its first name (see :class:`_StepModule`), so autograd already
    sums the gradients of every use into one, as eager ``.grad`` does: one parameter, one gradient, one
    update for every later pass.
    """
    for dup, (canon, kind) in tied_names(model).items():
        if kind == "param" and canon in tg.params:
            tg.tied[dup] = canon


def locate_op_source(model: nn.Module, example_inputs: Sequence[Any], loss_fn: Callable | None,
                     op_name: str) -> str | None:
    """The model source line of the first call that produced ``op_name`` (e.g. ``"aten::mm"``), or None.

    The joint graph's nodes carry AOTAutograd's generated code as their stack, not the model's, so this
    re-traces the forward alone (fake tensors, stack traces recorded) and reads the first matching node.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    flat, keys = flatten_batch(example_inputs)
    wrapper = _StepModule(model, loss_fn, keys)
    mode, fakes, fake_inputs = _fake_world(wrapper, flat)
    try:
        with _reparametrize_module(wrapper, fakes, tie_weights=True), mode, export_mode():
            gm = make_fx(wrapper, record_stack_traces=True)(*fake_inputs)
    except Exception:
        return None
    for node in gm.graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if schema is not None and schema.name == op_name:
            return user_frame(node.meta.get("stack_trace") or "")
    return None


def locate_param_mutation(model: nn.Module, example_inputs: Sequence[Any], loss_fn: Callable | None) -> str | None:
    """The model source line of the first in-place op on a parameter, or None: the forward re-run on fake
    tensors under a TorchFunctionMode that stops at the first ``op_(param, ...)``."""
    import traceback

    from torch.overrides import TorchFunctionMode

    flat, keys = flatten_batch(example_inputs)
    wrapper = _StepModule(model, loss_fn, keys)
    mode, fakes, fake_inputs = _fake_world(wrapper, flat)
    params = {id(t) for t in fakes.values() if t.requires_grad}

    class _Found(Exception):
        pass

    class _Watch(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            name = getattr(func, "__name__", "")
            if name.endswith("_") and not name.endswith("__") and args and id(args[0]) in params:
                frames = traceback.extract_stack()[:-1]
                raise _Found(user_frame("".join(traceback.format_list(frames))))
            return func(*args, **(kwargs or {}))

    try:
        with _reparametrize_module(wrapper, fakes, tie_weights=True), mode, export_mode(), _Watch():
            wrapper(*fake_inputs)
    except _Found as found:
        return found.args[0]
    except Exception:
        return None
    return None
