"""fused_cross_entropy: the head matmul, log-softmax and NLL (and their backward) as one chunked op.

The step's loss at a language model's head is ``cross_entropy(h @ W.T, target)``: in the captured step,
``mm(h, t(W))`` (through views and an fp32 upcast) -> ``_log_softmax`` -> ``nll_loss_forward``, with label
smoothing also ``sum(log_softmax)`` masked and averaged; and in the backward ``nll_loss_backward`` ->
``_log_softmax_backward_data`` -> two matmuls, the hidden states' gradient and the head weight's. Each of
the (tokens, vocabulary) tensors in between (the logits, their fp32 copy, the log-probabilities saved for
the backward, the backward's two) is as large as the head's weight times tokens / hidden.

This pass finds that pattern (``models.lm_loss`` and Hugging Face models' own loss alike: ``ignore_index``,
mean or sum, label smoothing) and replaces it by ``memfit::linear_cross_entropy(h, W, target, ...)``, placed
in the forward: it returns the loss, ``dh`` and ``dW`` for an incoming gradient of 1, the logits made
``chunk`` rows at a time (``memfit.kernels.cross_entropy``), so no (tokens, vocabulary) tensor exists past one
chunk. The backward's two matmuls are replaced by those outputs, scaled by the loss's incoming gradient when
it is not the step's seed of ones (a loss scaled after the head). With ``fused_update`` after it, the head's
update runs as soon as ``dW`` is complete, in the forward, when no later op reads the weight (tied
embeddings: the embedding's gradient is added in the backward, as before).

``chunk`` (rows per chunk; 0: the rule) is the one setting. The rule takes the largest power of two of rows
whose fp32 logits are no larger than the hidden states ``h`` or a quarter of the head's weight, whichever
is larger (at least 16 rows, at most all): the fused loss's workspace then stays below what the step
holds anyway (an activation, the head's gradient), and the chunk's matmuls are wide enough to run at
speed. When a budget is missed with the step's peak at the fused op (a small hidden size under a large
vocabulary), the planner asks ``refine``: a quarter of the chunk, down to one row, the same numbers (a
lossless lever of FLOPs 0).

A head with a bias (``addmm``) is fused too: the op also returns the bias's gradient, which replaces the
backward's ``sum(dlogits, [0])``. A site the pass cannot fuse (logits read elsewhere, ``reduction="none"``,
a loss not in fp32, weights by class) is left as it was, and the reason is logged (logger ``memfit.passes``) and kept in
``graph.info["fused_cross_entropy"]["skipped"]``. Runs before ``remat`` and ``fused_update``.
"""

from __future__ import annotations

import logging
import math
import operator
from dataclasses import dataclass

import torch
from torch import fx

from ..errors import ConfigError, where_what_got
from ..graph import TrainGraph, detached
from ..ops import args_of, op_call
from .base import Pass, PassResult, register_pass

aten = torch.ops.aten
log = logging.getLogger("memfit.passes")
_WHERE = "passes['fused_cross_entropy']"
_VIEWS = {aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.alias.default}
_PASSIVE = {aten._assert_tensor_metadata.default}  # users that read nothing at run time
MIN_CHUNK = 16


class _Skip(Exception):
    """A site left unfused, with the reason."""


def _is_fp32_cast(n: fx.Node) -> bool:
    return n.op == "call_function" and n.target in (aten._to_copy.default, aten.to.dtype) and \
        n.meta["val"].dtype == torch.float32 and len(n.all_input_nodes) == 1


def _live_users(n: fx.Node) -> list[fx.Node]:
    return [u for u in n.users if u.target not in _PASSIVE]


def _scalar(n: object, target, where: str) -> float:
    if not (isinstance(n, fx.Node) and n.target is target and isinstance(n.args[1], (int, float))):
        raise _Skip(f"label smoothing in an unrecognised form at {where}")
    return float(n.args[1])


def _only_user(n: fx.Node, target, where: str) -> fx.Node:
    users = _live_users(n)
    if len(users) != 1 or users[0].target is not target:
        raise _Skip(f"{where}: expected one {target} user, got {[u.target for u in users]}")
    return users[0]


def rule_chunk(n: int, hidden: int, vocab: int, h_size: int, w_size: int = 4) -> int:
    """Rows per chunk: the largest power of two whose fp32 logits fit in the larger of the bytes of ``h``
    (n x hidden) and a quarter of the head's weight (vocab x hidden), at least ``MIN_CHUNK`` rows, at most
    ``n``. The chunk then costs less than the weight gradient the op makes anyway, and is wide enough for
    the matmuls to run at speed (16 rows of a 32,000-word head take 1.8x the unfused step on CPU, 64 about
    1x)."""
    room = max(n * hidden * h_size, vocab * hidden * w_size // 4)
    rows = max(1, room // (4 * vocab))
    return min(n, max(MIN_CHUNK, 1 << (rows.bit_length() - 1)))


@register_pass("fused_cross_entropy")
@dataclass(frozen=True)
class FusedCrossEntropy(Pass):
    chunk: int = 0  # rows per chunk; 0: rule_chunk

    before = ("remat", "fused_update")

    def __post_init__(self):
        if isinstance(self.chunk, bool) or not isinstance(self.chunk, int) or self.chunk < 0:
            raise ConfigError(where_what_got(f"{_WHERE}.chunk", "a number of rows per chunk (0: the rule)",
                                             self.chunk, "e.g. chunk=1024, or leave it at 0"))

    def refine(self, g: TrainGraph, peak_node: str) -> FusedCrossEntropy | None:
        """When the step peaks at the fused op: a quarter of its chunk (at least one row), the same loss and
        gradients; None when the peak is elsewhere or the chunk is one row already."""
        node = next((n for n in g.graph.nodes if n.name == peak_node), None)
        if node is None or node.target is not torch.ops.memfit.linear_cross_entropy.default:
            return None
        chunk = args_of(node).chunk
        if chunk <= 1:
            return None
        return FusedCrossEntropy(chunk=max(1, chunk // 4))

    def run(self, g: TrainGraph) -> PassResult:
        fused, skipped = [], []
        for ls in [n for n in g.graph.nodes if n.target is aten._log_softmax.default]:
            try:
                site = self._match(g, ls)
            except _Skip as e:
                reason = f"{ls.name}: {e}"
                log.info("fused_cross_entropy: left unfused: %s", reason)
                skipped.append(reason)
                continue
            fused.append(self._rewrite(g, site))
        g.eliminate_dead_code()
        stats = {"fused": fused, "skipped": skipped}
        g.info["fused_cross_entropy"] = stats
        return PassResult(g, bool(fused), stats)

    # ---- matching -------------------------------------------------------------------------------------------

    def _match(self, g: TrainGraph, ls: fx.Node) -> dict:
        logits = ls.args[0]
        if logits.meta["val"].dim() != 2 or ls.args[1] not in (1, -1):
            raise _Skip("log_softmax not over the last dimension of 2-D logits")
        if ls.meta["val"].dtype != torch.float32:
            raise _Skip(f"a loss in {ls.meta['val'].dtype} (the fused op computes in fp32: upcast the logits)")
        # forward: logits <- views / fp32 casts <- mm(h, t(W)), each link read only by the next
        x = logits
        chain = [ls, logits]
        while x.op == "call_function" and (x.target in _VIEWS or _is_fp32_cast(x)):
            if len(_live_users(x)) != 1:
                raise _Skip(f"the logits ({x.name}) are read by {[u.name for u in _live_users(x)]}, not only the loss")
            x = x.args[0]
            chain.append(x)
        if x.target not in (aten.mm.default, aten.addmm.default) or len(_live_users(x)) != 1 or x.kwargs:
            raise _Skip(f"logits not made by one matmul read only by the loss (got {x.target})")
        head = x
        bias, (h2d, wt) = (None, x.args) if x.target is aten.mm.default else (x.args[0], x.args[1:])
        if bias is not None and tuple(bias.meta["val"].shape) != (wt.meta["val"].shape[1],):
            raise _Skip("a bias not of the vocabulary's shape")
        if wt.target is not aten.t.default:
            raise _Skip("a head product not of the form h @ W.T")
        weight = wt.args[0]
        n, hidden = h2d.meta["val"].shape
        vocab = weight.meta["val"].shape[0]
        # forward: the log-probabilities' readers
        nll, smooth_sum, others = None, None, []
        for u in _live_users(ls):
            if u.target is aten.nll_loss_forward.default:
                if nll is not None:
                    raise _Skip("two NLL losses on one log_softmax")
                nll = u
            elif u.target is aten.sum.dim_IntList and list(u.args[1]) in ([1], [-1]) and not u.kwargs:
                smooth_sum = u
            elif u.target in (aten.detach.default, aten.nll_loss_backward.default):
                continue
            else:
                others.append(u)
        if nll is None or others:
            raise _Skip(f"log_softmax read by {[o.target for o in others] or 'no NLL loss'}")
        _, target, weights, reduction, ignore_index = nll.args
        if weights is not None:
            raise _Skip("class weights")
        if reduction not in (1, 2):
            raise _Skip("reduction='none' (the per-token losses are the logits' size)")
        items = {u.args[1]: u for u in nll.users if u.target is operator.getitem}
        if 0 not in items:
            raise _Skip("the NLL loss value is not read")
        nll_value = items[0]
        eps = 0.0
        loss = nll_value
        if smooth_sum is not None:
            eps, loss = self._match_smoothing(nll_value, smooth_sum, target, ignore_index, reduction, vocab)
        # backward: the gradient of the logits and its two matmuls
        lsb = [u for d in [ls, *detached(ls)] for u in d.users if u.target is aten._log_softmax_backward_data.default]
        nll_b = [u for u in ls.users if u.target is aten.nll_loss_backward.default]
        if len(lsb) != 1 or len(nll_b) != 1:
            raise _Skip("the backward of log_softmax / NLL not found once")
        seed = nll_b[0].args[0]
        if eps:
            keep = _scalar(seed, aten.mul.Scalar, "the NLL branch's gradient")
            if not math.isclose(keep, 1 - eps, rel_tol=1e-6, abs_tol=1e-9):
                raise _Skip("label smoothing weights that do not match")
            seed = seed.args[0]
        dl = lsb[0]
        while True:
            users = _live_users(dl)
            if len(users) == 1 and (users[0].target in _VIEWS or users[0].target in (aten._to_copy.default,)):
                dl = users[0]
                continue
            break
        dh_mm, dw_mm, db_sum = None, None, None
        for u in _live_users(dl):
            if u.target is aten.mm.default and u.args[0] is dl and tuple(u.meta["val"].shape) == (n, hidden):
                dh_mm = u
            elif bias is not None and u.target is aten.sum.dim_IntList and list(u.args[1]) == [0]:
                db_sum = u
            elif u.target is aten.t.default:
                for v in _live_users(u):
                    if v.target is aten.mm.default and v.args[0] is u and _same(v.args[1], h2d):
                        dw_mm = v
            else:
                raise _Skip(f"the logits' gradient read by {u.target}")
        if dh_mm is None or dw_mm is None or (bias is not None and db_sum is None):
            raise _Skip("the backward's hidden-state, weight or bias gradient not found")
        if not _same(_untranspose(dh_mm.args[1]), weight):
            raise _Skip("the hidden-state gradient is not made with the head's weight")
        unit = seed.target is aten.ones_like.default and seed.args[0] is loss
        return {"head": head, "h2d": h2d, "weight": weight, "bias": bias, "db_sum": db_sum, "target": target,
                "nll": nll, "loss": loss,
                "eps": eps, "reduction": reduction, "ignore_index": ignore_index, "dh_mm": dh_mm,
                "dw_mm": dw_mm, "seed": None if unit else seed, "chain": chain, "n": n, "hidden": hidden,
                "vocab": vocab}

    @staticmethod
    def _match_smoothing(nll_value, smooth_sum, target, ignore_index, reduction, vocab) -> tuple[float, fx.Node]:
        """``(1 - eps) * nll + eps / V * smooth`` as torch's cross_entropy decomposes it: (eps, the sum node)."""
        neg = _only_user(smooth_sum, aten.neg.default, "the smoothing sum")
        fill = _only_user(neg, aten.masked_fill.Scalar, "the smoothing term")
        mask = fill.args[1]
        if not (mask.target is aten.eq.Scalar and mask.args[0] is target and mask.args[1] == ignore_index):
            raise _Skip("the smoothing term is not masked by the ignored targets")
        total = _only_user(fill, aten.sum.default, "the masked smoothing term")
        after = total
        if reduction == 1:
            after = _only_user(total, aten.div.Tensor, "the smoothing mean")
        k_s_node = _only_user(after, aten.mul.Scalar, "the smoothing weight")
        k_n_node = _only_user(nll_value, aten.mul.Scalar, "the NLL weight")
        k_s, k_n = float(k_s_node.args[1]), float(k_n_node.args[1])
        eps = k_s * vocab  # torch's eps / V times V: eps as given (1 - k_n rounds)
        if not math.isclose(1.0 - k_n, eps, rel_tol=1e-5, abs_tol=1e-9):
            raise _Skip(f"smoothing weights {k_n} and {k_s} are not 1 - eps and eps / V")
        adds = [u for u in _live_users(k_n_node) if u.target is aten.add.Tensor and
                set(u.args) == {k_n_node, k_s_node}]
        if len(adds) != 1:
            raise _Skip("the two smoothing terms are not added")
        return eps, adds[0]

    # ---- rewriting ----------------------------------------------------------------------------------------

    def _rewrite(self, g: TrainGraph, s: dict) -> dict:
        G = g.graph
        h_size = s["h2d"].meta["val"].element_size()
        w_size = s["weight"].meta["val"].element_size()
        chunk = self.chunk or rule_chunk(s["n"], s["hidden"], s["vocab"], h_size, w_size)
        with G.inserting_before(s["nll"]):
            op = op_call(G, torch.ops.memfit.linear_cross_entropy.default, h=s["h2d"], weight=s["weight"],
                         bias=s["bias"], target=s["target"], ignore_index=int(s["ignore_index"]),
                         label_smoothing=float(s["eps"]), reduction=int(s["reduction"]), chunk=int(chunk))
            loss, dh, dw, db = (G.call_function(operator.getitem, (op, i)) for i in range(4))
        replaced = [(s["loss"], loss), (s["dh_mm"], dh), (s["dw_mm"], dw)]
        if s["bias"] is not None:  # the backward's sum(dlogits, [0], keepdim): the bias gradient in its shape
            with G.inserting_before(s["db_sum"]):
                db = G.call_function(aten.view.default, (db, list(s["db_sum"].meta["val"].shape)))
            replaced.append((s["db_sum"], db))
        for old, new in replaced:
            if old is not s["loss"] and s["seed"] is not None:  # a loss scaled after the head: its gradient
                with G.inserting_before(old):                  # is not 1
                    new = G.call_function(aten.mul.Tensor, (new, s["seed"]))
            old.replace_all_uses_with(new)
            if g.loss is old:
                g.loss = new
            for f, n in g.grad_of.items():
                if n is old:
                    g.grad_of[f] = new
        for v in s["chain"]:  # shape asserts on the logits would keep them alive (they are impure)
            for u in [u for u in v.users if u.target in _PASSIVE]:
                G.erase_node(u)
        logits = s["n"] * s["vocab"] * 4
        return {"weight": _name(g, s["weight"]), "tokens": s["n"], "vocab": s["vocab"], "chunk": chunk,
                "label_smoothing": s["eps"], "ignore_index": int(s["ignore_index"]),
                "reduction": "mean" if s["reduction"] == 1 else "sum", "logits_bytes": logits,
                "bias": s["bias"] is not None, "scaled": s["seed"] is not None}


def _strip_views(n: fx.Node) -> fx.Node:
    while n.op == "call_function" and n.target in _VIEWS:
        n = n.args[0]
    return n


def _same(a: fx.Node, b: fx.Node) -> bool:
    return _strip_views(a) is _strip_views(b)


def _untranspose(n: fx.Node) -> fx.Node:
    """``t(t(W))`` -> ``W`` (the backward reads the head's weight through two transposes)."""
    flips = 0
    while n.op == "call_function" and n.target is aten.t.default:
        n, flips = n.args[0], flips + 1
    if flips % 2:
        raise _Skip("the hidden-state gradient reads the head's weight transposed")
    return n


def _name(g: TrainGraph, node: fx.Node) -> str:
    return next((f for f, p in g.params.items() if p is node), node.name)
