"""Executor: runs lowered TrainGraph steps, owns the persistent tensors, and makes a step atomic.

It decides nothing: the placeholders' roles say where each argument comes from, the output layout
says where each result goes (loss back to the caller, new buffer values copied into the buffers,
remaining gradients handed back). One Executor serves every compiled shape of a Trainer: the
persistent tensors (parameters, buffers, optimizer state) are shared, each :class:`CompiledStep`
brings its own graph, slots and output layout.

Atomic steps. Only memfit's update ops change parameters and optimizer state, and they all run
through :func:`memfit.runtime.lower.step_hook`. A :class:`StepGuard` watches them for one optimizer
step (all its micro-batches):

* before the first change nothing needs undoing but what is cheap: gradient accumulators (zero at
  the start of every step), the buffers the step writes (BatchNorm statistics, snapshotted), the RNG
  state and the step count;
* ``nonfinite="raise" | "skip"`` checks the loss right after the forward (before any update) and each
  gradient right before its update op; a non-finite one stops the step there. Data parallel, the ranks
  agree on the loss first (``agree``: one 1-element all-reduce), so all of them stop together and none
  waits in a collective the others left; replicated, gradients need no such vote (each update reads the
  reduced one, the same on every rank); sharded, only the owner sees a parameter's reduced gradient, so in
  ``skip`` mode a non-finite one skips that parameter's update (its owner broadcasts it unchanged) and the
  Trainer warns, where raising would leave the other ranks waiting;
* ``transactional=True`` also copies what each update op is about to change (a journal), so a failure
  after updates began (a kernel error, an interrupt, a non-finite gradient deep in the backward) is
  undone exactly too, at the cost of up to one copy of the parameters and optimizer state;
* without the journal, a failure after updates began cannot be undone and says so
  (:class:`~memfit.errors.StepError`); a non-finite gradient there in ``skip`` mode skips that one
  parameter's update and the Trainer warns with the names.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .. import ops as memfit_ops
from ..errors import NonFiniteError, UnsupportedGraph, where_what_got
from ..graph import NAME_KEY, ROLE_KEY, StateSpec, TrainGraph
from .lower import Lowered, step_hook, use_triton

NONFINITE_MODES = ("raise", "skip", "ignore")


@dataclass
class StepOutputs:
    loss: torch.Tensor
    grads: dict[str, torch.Tensor]


@dataclass
class CompiledStep:
    """One lowered graph of the step (one input shape / module mode) and how to call it."""

    graph: TrainGraph
    lowered: Lowered
    plan: object
    slots: list[tuple[str, str]] = field(default_factory=list)
    layout: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self):
        self.slots = [(n.meta[ROLE_KEY], n.meta[NAME_KEY]) for n in self.graph.placeholders()]
        self.layout = self.graph.output_layout()


class Executor:
    def __init__(self, g: TrainGraph, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                 device: torch.device):
        self.params = params
        self.buffers = buffers
        self.device = device
        self.state_specs: dict[str, StateSpec] = dict(g.state_specs)
        self.state: dict[str, torch.Tensor] = {
            name: torch.zeros(spec.shape, dtype=spec.dtype, device=device) for name, spec in g.state_specs.items()}
        self.param_name = {id(t): name for name, t in params.items()}

    def persistent_tensors(self) -> list[torch.Tensor]:
        return [*self.params.values(), *self.buffers.values(), *self.state.values()]

    def accumulators(self) -> list[torch.Tensor]:
        return [self.state[k] for k, s in self.state_specs.items() if s.kind == "accumulator"]

    def check_same_state(self, g: TrainGraph, where: str) -> None:
        """A graph compiled for another shape must read exactly the state this executor owns."""
        if g.state_specs != self.state_specs:
            diff = sorted(set(g.state_specs) ^ set(self.state_specs))[:5]
            raise UnsupportedGraph(where_what_got(
                where, "the same optimizer state as the first compiled shape",
                f"a different state set (differences {diff})",
                "the passes chose differently for this shape; pass passes= explicitly to memfit.optimize"))

    def run(self, compiled: CompiledStep, inputs: Sequence[torch.Tensor], hparams: dict[str, float | int],
            guard: StepGuard | None = None) -> StepOutputs:
        source = {"param": self.params, "buffer": self.buffers, "state": self.state, "hparam": hparams}
        args: list = []
        n_input = 0
        for role, name in compiled.slots:
            if role == "input":
                args.append(inputs[n_input])
                n_input += 1
            else:
                args.append(source[role][name])
        with step_hook(guard):
            outs = compiled.lowered(args)
        loss, grads = None, {}
        for (kind, name), value in zip(compiled.layout, outs, strict=True):
            if kind == "loss":
                loss = value
            elif kind == "buffer":
                self.buffers[name].copy_(value)
            else:
                grads[name] = value
        return StepOutputs(loss.detach(), grads)


class StepGuard:
    """Watches one optimizer step's update ops; undoes the step when it fails (see the module doc)."""

    def __init__(self, executor: Executor, *, nonfinite: str, transactional: bool, reset_moments: bool = False,
                 buffers: Sequence[str] = (), agree: Callable[[bool], bool] | None = None, owned_only: bool = False):
        self.executor = executor
        self.agree = agree  # data parallel: (this rank's loss is non-finite) -> whether any rank's is
        # sharded data parallel: this rank alone sees its parameters' reduced gradients, and raising would leave
        # the other ranks in the step's collectives: a non-finite one skips its parameter ("skip" mode)
        self.owned_only = owned_only
        self.nonfinite = nonfinite
        self.transactional = transactional
        self.reset_moments = reset_moments
        self.applied = 0  # update ops that changed parameters or optimizer state this step
        self.skipped: list[str] = []  # parameters whose update was skipped (non-finite gradient, no journal)
        self.journal: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.journal_bytes = 0
        # the RNG state kept as bytes: no tensor alive during the step beyond what the plan counts
        self.rng = torch.get_rng_state().numpy().tobytes()
        self.cuda_rng = (torch.cuda.get_rng_state(executor.device).numpy().tobytes()
                         if executor.device.type == "cuda" else None)
        self.buffers = {k: executor.buffers[k].clone() for k in buffers}

    # ---- called from inside the lowered graph -----------------------------------------------------
    def on_loss(self, loss: torch.Tensor) -> None:
        if self.nonfinite == "ignore":
            return
        bad = not (math.isfinite(loss.item()) if loss.numel() == 1 else bool(torch.isfinite(loss).all()))
        if bad:
            raise_it = True
            if self.agree is not None:
                self.agree(True)  # the other ranks learn it before anyone leaves the step
        else:
            raise_it = self.agree is not None and self.agree(False)
            if raise_it:
                raise NonFiniteError(where_what_got("Trainer.step", "a finite loss on every rank of the process group",
                                                    "a non-finite loss on another rank (this rank's is finite)",
                                                    "check that rank's batch for NaN/inf values or lower the learning "
                                                    "rate"), what="loss (on another rank)",
                                     before_updates=self.applied == 0)
        if raise_it:
            raise NonFiniteError(where_what_got("Trainer.step", "a finite loss", f"loss {loss.item()}",
                                                "check the batch for NaN/inf values or lower the learning rate"),
                                 what="loss", before_updates=self.applied == 0)

    def before_op(self, op, args: tuple, kwargs: dict) -> bool:
        """Called before a memfit update op runs; False skips the op."""
        named = _named_args(op, args, kwargs)
        micro, micro_steps = named.get("micro_step", 0), named.get("micro_steps", 1)
        applying = micro_steps <= 1 or micro >= micro_steps - 1
        fqn = self.executor.param_name.get(id(named.get("param")), "?")
        if self.nonfinite != "ignore" and not _gradient_finite(named):
            if (self.applied == 0 or self.transactional or self.nonfinite == "raise") and not (
                    self.owned_only and self.nonfinite == "skip"):
                raise NonFiniteError(where_what_got(
                    "Trainer.step", f"a finite gradient of {fqn}", "NaN/inf values",
                    "check the batch, lower the learning rate, or clip gradients"),
                    what=f"gradient of {fqn}", before_updates=self.applied == 0)
            self.skipped.append(fqn)  # updates already applied and no journal: skip this one parameter
            acc = named.get("grad_acc")
            if applying and isinstance(acc, torch.Tensor):
                acc.zero_()
            return False
        if not applying:
            return True
        writes = _written_tensors(op, named)
        if self.transactional:
            for name, t in writes.items():
                if name != "grad_acc":
                    self.journal.append((t, t.clone()))
                    self.journal_bytes += t.numel() * t.element_size()
        if self.reset_moments:
            for name in ("exp_avg", "exp_avg_sq"):
                t = named.get(name)
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    t.zero_()
        self.applied += 1
        return True

    # ---- after the step -----------------------------------------------------------------------------
    def rollback(self) -> bool:
        """Put back everything the step changed; True when that was exact (nothing left changed)."""
        ex = self.executor
        for t, saved in reversed(self.journal):
            t.copy_(saved)
        self.journal.clear()
        for acc in ex.accumulators():
            acc.zero_()
        for k, saved in self.buffers.items():
            ex.buffers[k].copy_(saved)
        torch.set_rng_state(torch.frombuffer(bytearray(self.rng), dtype=torch.uint8))
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state(torch.frombuffer(bytearray(self.cuda_rng), dtype=torch.uint8), ex.device)
        return self.applied == 0 or self.transactional

    def commit(self) -> None:
        self.journal.clear()


def all_finite(t: torch.Tensor) -> bool:
    """Whether every element is finite, without a tensor-sized temporary: a NaN or inf anywhere makes the
    sum NaN or inf; only when it is does the exact (temporary-allocating) check decide, which also clears
    the rare finite tensor whose sum overflows. The common path holds one 0-dim sum (``ops.FINITE_CHECK_BYTES``,
    declared in every guarded op's workspace)."""
    if math.isfinite((t.sum(dtype=torch.float32) if t.is_floating_point() else t.sum()).item()):
        return True
    return bool(torch.isfinite(t).all())


def _gradient_finite(named: dict) -> bool:
    """Whether an update op's gradient is finite: the tensor, or the chunks its ``grad_program`` makes (the
    same chunks, buffer and kernel the op then makes them with, so the check holds no more than the op)."""
    grad = named.get("grad")
    if isinstance(grad, torch.Tensor):
        return all_finite(grad)
    if not named.get("grad_program"):
        return True
    from ..kernels.pointwise import run_triton

    param = named["param"]
    fused = run_triton if use_triton(param.device) else None
    return all(all_finite(part) for _, part in memfit_ops.prologue_parts(named["grad_program"], named["grad_inputs"],
                                                                         param, fused))


def _named_args(op, args: tuple, kwargs: dict) -> dict:
    schema = op._schema
    out = {}
    for i, a in enumerate(schema.arguments):
        if i < len(args):
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out


def _written_tensors(op, named: dict) -> dict[str, torch.Tensor]:
    return {a.name: named[a.name] for a in op._schema.arguments
            if a.alias_info is not None and a.alias_info.is_write and isinstance(named.get(a.name), torch.Tensor)}
