"""data_parallel: the step's gradients averaged over the ranks of a process group, inside the graph.

Every rank runs the same compiled step on its own part of the global batch. Each parameter's update op
steps the mean of the ranks' gradients, averaged by ``torch.distributed`` all-reduces (sum, then a division by
the world size), so every rank makes the same update and the result is single-process training on the
concatenated batch (each rank's loss is the mean over its own equal share).

Buckets, overlapped (``bucket_bytes``, by default an eighth of the gradients' bytes within [64 KiB, 25 MiB]):
gradients are packed in the order the backward completes them into buckets (one dtype each).
``memfit::all_reduce_start`` copies a bucket's gradients into one flat tensor, where they die, and starts its
all-reduce asynchronously; the backward runs on, and only when the next bucket starts does
``memfit::bucket_wait`` finish this one, its updates then running on views of it (the last bucket is
waited on at once). So communication overlaps the backward as in DDP, at the price the plan counts: a
bucket lives from its start until its last update, about two buckets more than one gradient at a time.
``bucket_bytes=0`` all-reduces each gradient alone and synchronously (``memfit::all_reduce_mean``) where the
backward completes it. Updates that something reads after (none in a plain step) are not bucketed.

A gradient GaLore holds as factors ``L @ R`` (``lowrank``'s ``factored`` path: tokens inner) is not formed
when its factors are fewer bytes: the ranks' factors are all-gathered and concatenated
(``memfit::all_gather_cat``), ``[L_1 .. L_W] @ [R_1; ..; R_W] / W`` being the mean gradient (tokens x
(m + n) values sent instead of m x n); otherwise it is formed and all-reduced (bucketed).
``graph.info["data_parallel"]`` counts the all-reduces, buckets, factor gathers and the bytes each rank sends
per step.

Projected communication (``projected=True``, the default): a GaLore update (a stored orthonormal projector,
fp32 gradient) reads its gradient only as ``P^T G``, and every rank holds the same ``P`` (each refresh is the
SVD of the same reduced gradient), so the mean of the ranks' projections is the projection of the mean:
``memfit::all_reduce_projected`` all-reduces ``P^T G_i`` (rank x n, or m x rank) and hands the update
``P (P^T G)`` (``P^T P = I``); on the steps where the subspace refreshes it all-reduces the whole gradient
instead. With buckets on (``bucket_bytes`` not 0) this is overlapped like a bucket of its own:
``memfit::projected_start`` (where the gradient is complete: the projection, or on a refresh the whole
gradient, written into the update's (m, n) input and its all-reduce started) and ``memfit::projected_wait``
after the next start (the mean projection projected back in place). ``bytes_per_step`` then counts the
projections, ``extra_bytes_on_refresh`` what a refresh adds.
APOLLO (it scales the full gradient) and Fira (it steps the residual outside the subspace) need the whole
mean gradient: they are all-reduced as it.

Gradient accumulation (``micro_steps``): ``memfit::all_reduce_accumulated`` passes each micro-step's
gradient through and, on the last, all-reduces the update's accumulator in place (with that micro-step's
gradient added) and hands the update zeros: one collective per gradient per optimizer step. Clipping
(``clip_grad_norm``): fused_update tags the gradients it clips; each is all-reduced where the backward
completes it, before the clip reads it, so the norm is the reduced gradients' (as clipping after DDP's
backward). Pruning masks are refused (their events read the local gradient). BatchNorm running statistics:
the Trainer broadcasts every buffer from the group's first rank before each step, as PyTorch DDP does by
default.

Sharded optimizer state (``shard="state"``, ZeRO stages 1 and 2): every parameter is owned by one rank
(greedy by optimizer-state bytes, largest first, to the least-loaded rank; every rank computes the same
table from the same step). Gradients are reduced onto their owners in the same buckets, overlapped the same
way: ``memfit::reduce_start`` copies a bucket's gradients (grouped by owner) into a flat tensor and starts
one asynchronous ``reduce`` per owner's run, ``memfit::bucket_wait`` finishes them once the next bucket has
started; the owner runs each update op, with its state, unchanged, on its view of the bucket; then every
parameter tensor the update wrote is broadcast from the owner with ``memfit::broadcast_start_`` (in place,
left running), all of them finished by one ``memfit::broadcasts_wait`` at the end of the step. Every rank
issues the same collectives in the same order: the buckets in backward order, each bucket's broadcasts in
its order. (``bucket_bytes=0``: ``memfit::reduce_mean`` on the owner, ``memfit::reduce_send_`` elsewhere,
``memfit::broadcast_`` after the update, one parameter at a time, synchronously.) The other ranks hold
neither the state nor the update: their state placeholders are gone from their step, so each rank's plan
counts only its own shard. With the fused update a gradient already dies at its update, so sharding
gradients (ZeRO-2) costs nothing more than sharding the state (ZeRO-1) beyond the buckets in flight.
Whole parameters are the unit, so the update (8-bit blocks, GaLore's SVD, APOLLO's projection, INT8
weights) is the one-process update bit for bit; the price is balance, bounded below by the largest
parameter's state. Micro-steps and clipping are refused with it (every rank would need every gradient).
``group_rank`` is this rank's place in the group (``memfit plan --world-size`` plans any rank without a
group).

Needs ``fused_update``; runs after every lever (``last``), on the updates they chose. ``process_group`` is the
process group's name, ``world`` its size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import projection as pj
from ..errors import ConfigError, where_what_got
from ..graph import NAME_KEY, ROLE_KEY, TrainGraph, aliases, is_view_op, storage_root
from ..ops import args_of, op_call, replace_args
from .base import Pass, PassResult, register_pass
from .fused_update import RAW_GRAD_KEY

_WHERE = "passes['data_parallel']"
SHARDS = ("none", "state", "params")


@register_pass("data_parallel")
@dataclass(frozen=True)
class DataParallel(Pass):
    process_group: str = ""  # the torch.distributed group's name (not "group": quantize_weights has one)
    world: int = 0
    group_rank: int = 0
    shard: str = "none"  # "none": every rank updates every parameter; "state": one owner per parameter
    projected: bool = True  # GaLore's gradients all-reduced in their subspace between refreshes
    bucket_bytes: int = -1  # gradients per all-reduce bucket: -1 the rule (bucket_cap), 0 one synchronous each
    prefetch: bool = True  # shard="params": each weight's fetch started one fetch ahead of its first reader

    requires = ("fused_update",)
    keeps_meta = True
    last = True

    def __post_init__(self):
        if not self.process_group or isinstance(self.world, bool) or not isinstance(self.world, int) or self.world < 1:
            raise ConfigError(where_what_got(_WHERE, "a process group's name and its size >= 1",
                                             f"process_group={self.process_group!r}, world={self.world!r}",
                                             "pass process_group= to memfit.optimize"))
        if self.shard not in SHARDS:
            raise ConfigError(where_what_got(f"{_WHERE}.shard", f"one of {SHARDS}", repr(self.shard),
                                             "'state' keeps each parameter's optimizer state on one rank"))
        if isinstance(self.bucket_bytes, bool) or not isinstance(self.bucket_bytes, int) or self.bucket_bytes < -1:
            raise ConfigError(where_what_got(f"{_WHERE}.bucket_bytes", "an int: bytes per bucket, 0 for none, "
                                             "-1 for the default rule", repr(self.bucket_bytes),
                                             "e.g. bucket_bytes=25 * 2**20 (DDP's bucket_cap_mb=25)"))
        if not isinstance(self.prefetch, bool):
            raise ConfigError(where_what_got(f"{_WHERE}.prefetch", "True or False", repr(self.prefetch),
                                             "False fetches each sharded weight where it is read"))
        if isinstance(self.group_rank, bool) or not isinstance(self.group_rank, int) or \
                not 0 <= self.group_rank < self.world:
            raise ConfigError(where_what_got(f"{_WHERE}.group_rank", f"an int in [0, {self.world})",
                                             repr(self.group_rank),
                                             "the rank's place in its process group"))

    def run(self, g: TrainGraph) -> PassResult:
        if any(n.target is torch.ops.memfit.prune_mask.default for n in g.graph.nodes):
            raise ConfigError(where_what_got(_WHERE, "a step without pruning masks",
                                             "prune's mask op (its events read the local gradient)",
                                             "prune on one process, or drop prune"))
        raw = [n for n in g.graph.nodes if RAW_GRAD_KEY in n.meta]
        if raw:  # clipping reads the gradients: reduce each where the backward completes it, before any reader
            if self.shard != "none":
                raise ConfigError(where_what_got(_WHERE, "no gradient clipping in a sharded step "
                                                 "(shard='state' or 'params')",
                                                 "clip_grad_norm (its norm needs every reduced gradient)",
                                                 "drop clip_grad_norm, or shard='none'"))
            sent = 0
            for n in raw:
                with g.graph.inserting_after(n):
                    mean = op_call(g.graph, torch.ops.memfit.all_reduce_mean.default, grad=n, group=self.process_group,
                                   world=self.world, name=f"the gradient of {n.meta[RAW_GRAD_KEY]}")
                mean.meta["val"] = n.meta["val"]
                n.replace_all_uses_with(mean, delete_user_cb=lambda u, m=mean: u is not m)
                sent += n.meta["val"].numel() * n.meta["val"].element_size()
            stats = {"all_reduces": len(raw), "factor_gathers": 0, "projected_all_reduces": 0,
                     "bytes_per_step": sent, "extra_bytes_on_refresh": 0, "world": self.world, "shard": self.shard,
                     "reduced_before_clipping": True}
            g.info["data_parallel"] = stats
            return PassResult(g, True, stats, meta_ok=True)
        sent, gathered, projected, refresh_bytes = 0, 0, 0, 0
        plain = []  # (fqn, update) whose whole gradient is all-reduced: bucketed after the loop
        projected_async = []  # (fqn, update) whose projection is all-reduced, in the buckets' sequence
        order = {n: i for i, n in enumerate(g.graph.nodes)}
        for f, upd in g.updates.items():
            a = args_of(upd)
            if a.grad is None:
                continue
            if self.shard == "none" and self.projected and _projectable(upd):
                d = a.as_dict()
                g_val, right = a.grad.meta["val"], a.grad_right
                m, n = g_val.shape[0], right.meta["val"].shape[1] if right is not None else g_val.shape[1]
                if self.bucket_bytes != 0 and _movable(upd, order):  # started and waited for as a bucket
                    projected_async.append((f, upd))
                else:
                    with g.graph.inserting_before(upd):
                        mean = op_call(g.graph, torch.ops.memfit.all_reduce_projected.default, grad=a.grad,
                                       grad_right=right, proj=a.proj, sched=a.sched, step=d["step"],
                                       side=pj.side_of((m, n)), group=self.process_group, world=self.world,
                                       name=f"the gradient of {f}")
                    mean.meta["val"] = g_val.new_empty((m, n))
                    upd.args, upd.kwargs = replace_args(upd, grad=mean, grad_right=None)
                low = pj.low_shape((m, n), d["rank"])
                projected += 1
                sent += 4 * low[0] * low[1]
                refresh_bytes += 4 * m * n - 4 * low[0] * low[1]
                continue
            micro = a.as_dict().get("micro_steps", 1)
            if micro > 1 and self.shard != "none":
                raise ConfigError(where_what_got(_WHERE, "one micro-step per step in a sharded step "
                                                 "(shard='state' or 'params')",
                                                 f"micro_steps={micro} (every rank would accumulate every gradient)",
                                                 "drop micro_steps=, or shard='none'"))
            right = a.as_dict().get("grad_right")
            if right is not None:
                (m, tokens), n = a.grad.meta["val"].shape, right.meta["val"].shape[1]
                if self.shard != "none" or micro > 1 or tokens * (m + n) >= m * n:  # form it, reduce it
                    with g.graph.inserting_before(upd):
                        full = g.graph.call_function(torch.ops.aten.mm.default, (a.grad, right))
                    full.meta["val"] = a.grad.meta["val"].new_empty((m, n))
                    upd.args, upd.kwargs = replace_args(upd, grad=full, grad_right=None)
                    a = args_of(upd)
                    right = None
            if right is not None:  # a gradient held as factors L @ R (tokens inner): gather, never form it
                with g.graph.inserting_before(upd):
                    left = op_call(g.graph, torch.ops.memfit.all_gather_cat.default, t=a.grad, dim=1,
                                   scale=1.0 / self.world, group=self.process_group, world=self.world,
                                   name=f"the gradient of {f} (left factor)")
                    rows = op_call(g.graph, torch.ops.memfit.all_gather_cat.default, t=right, dim=0, scale=1.0,
                                   group=self.process_group, world=self.world,
                                   name=f"the gradient of {f} (right factor)")
                for node, src, dim in ((left, a.grad, 1), (rows, right, 0)):
                    shape = list(src.meta["val"].shape)
                    shape[dim] *= self.world
                    node.meta["val"] = src.meta["val"].new_empty(shape)
                upd.args, upd.kwargs = replace_args(upd, grad=left, grad_right=rows)
                gathered += 1
                sent += sum(v.meta["val"].numel() * v.meta["val"].element_size() for v in (a.grad, right))
                continue
            val = a.grad.meta["val"]
            sent += val.numel() * val.element_size()
            if self.shard != "none":
                continue
            if micro == 1 and self.bucket_bytes != 0 and _movable(upd, order):
                plain.append((f, upd))
                continue
            with g.graph.inserting_before(upd):
                if micro > 1:  # accumulated locally; the sum all-reduced once, on the last micro-step
                    mean = op_call(g.graph, torch.ops.memfit.all_reduce_accumulated.default, grad=a.grad,
                                   grad_acc=a.grad_acc, micro_step=a.as_dict()["micro_step"], micro_steps=micro,
                                   group=self.process_group, world=self.world, name=f"the gradient of {f}")
                    acc = a.grad_acc.meta["val"]
                    sent += acc.numel() * acc.element_size() - val.numel() * val.element_size()
                else:
                    mean = op_call(g.graph, torch.ops.memfit.all_reduce_mean.default, grad=a.grad,
                                   group=self.process_group, world=self.world, name=f"the gradient of {f}")
            mean.meta["val"] = a.grad.meta["val"]
            upd.args, upd.kwargs = replace_args(upd, grad=mean)
        buckets = self._bucket(g, plain, projected_async) if plain or projected_async else []
        stats = {"all_reduces": 0 if self.shard != "none" else len(g.updates) - gathered - projected - len(plain),
                 "buckets": len(buckets), "bucketed": len(plain), "bucket_cap": self.bucket_cap(g),
                 "factor_gathers": gathered, "projected_all_reduces": projected, "bytes_per_step": sent,
                 "extra_bytes_on_refresh": refresh_bytes, "world": self.world, "shard": self.shard}
        if self.shard in ("state", "params"):
            stats.update(self._shard_state(g, broadcast=self.shard == "state"))
        if self.shard == "params":
            stats.update(self._shard_params(g, stats["owners"]))
        g.info["data_parallel"] = stats
        return PassResult(g, bool(g.updates), stats, meta_ok=True)

    def bucket_cap(self, g: TrainGraph) -> int:
        """Bytes per bucket: ``bucket_bytes`` when given, else an eighth of the gradients' bytes (overlap for
        all but the last eighth, at most about two buckets more alive than unbucketed), between 64 KiB and
        DDP's 25 MiB."""
        if self.bucket_bytes >= 0:
            return self.bucket_bytes
        total = sum(_nbytes(args_of(u).grad) for u in g.updates.values() if args_of(u).grad is not None)
        return min(max(total // 8, 64 << 10), 25 << 20)

    def _groups(self, g: TrainGraph, items: list) -> list[list]:
        """``items`` (fqn, update) in the order the backward completes their gradients, packed into buckets
        of at most ``bucket_cap`` bytes, one dtype and device each."""
        cap = self.bucket_cap(g)
        order = {n: i for i, n in enumerate(g.graph.nodes)}
        groups, cur, size = [], [], 0
        for f, upd in sorted(items, key=lambda fu: order[args_of(fu[1]).grad]):
            grad = args_of(upd).grad
            b, kind = _nbytes(grad), (grad.meta["val"].dtype, grad.meta["val"].device)
            if cur and (size + b > cap or kind != cur[-1][2]):
                groups.append(cur)
                cur, size = [], 0
            cur.append((f, upd, kind))
            size += b
        groups.append(cur)
        return [[(f, u) for f, u, _ in grp] for grp in groups]

    def _start_buckets(self, g: TrainGraph, groups: list[list], op, **extra) -> list:
        """One ``op`` (``all_reduce_start`` or ``reduce_start``) per bucket, right after its last gradient is
        complete; ``extra(group) -> dict`` adds its arguments. Returns the start nodes."""
        order = {n: i for i, n in enumerate(g.graph.nodes)}
        starts = []
        for grp in groups:
            grads = [args_of(u).grad for _, u in grp]
            last = max(grads, key=order.__getitem__)
            names = [f for f, _ in grp]
            label = f"the gradient of {names[0]}" if len(names) == 1 else \
                f"a bucket of {len(names)} gradients ({names[0]} .. {names[-1]})"
            with g.graph.inserting_after(last):
                start = op_call(g.graph, op, grads=grads, group=self.process_group, world=self.world, name=label,
                                **{k: fn(grp) for k, fn in extra.items()})
            start.meta["val"] = grads[0].meta["val"].new_empty((sum(x.meta["val"].numel() for x in grads),))
            starts.append(start)
        return starts

    def _wait_after_next(self, g: TrainGraph, starts: list, k: int):
        """Bucket ``k``'s ``bucket_wait``, right after the next bucket's start (the last: after its own)."""
        anchor = starts[k + 1] if k + 1 < len(starts) else starts[k]
        with g.graph.inserting_after(anchor):
            wait = op_call(g.graph, torch.ops.memfit.bucket_wait.default, bucket=starts[k], world=self.world)
        wait.meta["val"] = None
        return wait

    @staticmethod
    def _read_from(g: TrainGraph, bucket, at, upd, off: int) -> int:
        """``upd`` moved to just after ``at``, reading its gradient as the view of ``bucket`` at ``off``;
        returns the offset after it."""
        val = args_of(upd).grad.meta["val"]
        with g.graph.inserting_after(at):
            piece = g.graph.call_function(torch.ops.aten.slice.Tensor, (bucket, 0, off, off + val.numel()))
        with g.graph.inserting_after(piece):
            view = g.graph.call_function(torch.ops.aten.view.default, (piece, list(val.shape)))
        piece.meta["val"] = bucket.meta["val"][off:off + val.numel()]
        view.meta["val"] = piece.meta["val"].view(val.shape)
        upd.args, upd.kwargs = replace_args(upd, grad=view)
        view.append(upd)
        return off + val.numel()

    def _bucket(self, g: TrainGraph, plain: list, projected: list = ()) -> list[list[str]]:
        """All-reduce the gradients of ``plain`` (fqn, update) in buckets, overlapped with the backward.

        Gradients are taken in the order the backward completes them and packed into buckets of at most
        ``bucket_cap`` bytes (one dtype each). Each bucket's ``memfit::all_reduce_start`` copies its gradients
        into one flat tensor (the gradients die there) and starts the all-reduce; the backward runs on until
        the next bucket starts, and only then does ``memfit::bucket_wait`` finish this one and its updates
        run, each reading its gradient as a view of the bucket. The last bucket is waited on at once.
        ``projected`` (GaLore updates whose projection is all-reduced) take part in the same sequence, one each:
        ``memfit::projected_start`` where the gradient is complete, ``memfit::projected_wait`` after the next
        start. Both hold only updates nothing reads after (``_movable``): they may run later."""
        groups = self._groups(g, plain) if plain else []
        starts = self._start_buckets(g, groups, torch.ops.memfit.all_reduce_start.default) if groups else []
        entries = list(zip(starts, groups, strict=True))
        order = {n: i for i, n in enumerate(g.graph.nodes)}
        for f, upd in projected:
            a = args_of(upd)
            d, right = a.as_dict(), a.grad_right
            g_val = a.grad.meta["val"]
            m, n = g_val.shape[0], right.meta["val"].shape[1] if right is not None else g_val.shape[1]
            last = max([x for x in (a.grad, right) if x is not None], key=order.__getitem__)
            with g.graph.inserting_after(last):
                start = op_call(g.graph, torch.ops.memfit.projected_start.default, grad=a.grad, grad_right=right,
                                proj=a.proj, sched=a.sched, step=d["step"], side=pj.side_of((m, n)),
                                group=self.process_group, world=self.world, name=f"the gradient of {f}")
            start.meta["val"] = g_val.new_empty((m, n), dtype=torch.float32)
            entries.append((start, [(f, upd)]))
        order = {n: i for i, n in enumerate(g.graph.nodes)}
        entries.sort(key=lambda e: order[e[0]])
        starts = [e[0] for e in entries]
        for k, (start, grp) in enumerate(entries):
            if start.target is torch.ops.memfit.all_reduce_start.default:
                at, off = self._wait_after_next(g, starts, k), 0
                for _, upd in grp:
                    off = self._read_from(g, start, at, upd, off)
                    at = upd
                continue
            (_, upd), = grp
            a = args_of(upd)
            with g.graph.inserting_after(starts[k + 1] if k + 1 < len(starts) else start):
                wait = op_call(g.graph, torch.ops.memfit.projected_wait.default, out=start, proj=a.proj,
                               side=args_of(start).side, world=self.world)
            wait.meta["val"] = None
            upd.args, upd.kwargs = replace_args(upd, grad=start, grad_right=None)
            wait.append(upd)
        return [[f for f, _ in grp] for _, grp in entries]

    def _shard_state(self, g: TrainGraph, broadcast: bool = True) -> dict:
        """Each update runs on its parameter's owner only; the rest reduce onto it and (``broadcast``) receive
        the result."""
        owners = owner_table(g, self.world)
        kinds = {f: str(upd.target) for f, upd in g.updates.items()}  # every rank's, before its own are dropped
        items = [(f, upd) for f, upd in g.updates.items() if args_of(upd).grad is not None]
        order = {n: i for i, n in enumerate(g.graph.nodes)}
        if self.bucket_bytes != 0 and items and all(_movable(u, order) for _, u in items):
            return self._shard_buckets(g, items, owners, kinds, broadcast)
        sent = 0
        mine_state, all_state = 0, 0
        for f, upd in list(g.updates.items()):
            a = args_of(upd)
            if a.grad is None:
                continue
            owner, (state, state_bytes, written) = owners[f], _sharded_update(g, f, upd, broadcast)
            all_state += state_bytes
            if owner == self.group_rank:
                mine_state += state_bytes
                with g.graph.inserting_before(upd):
                    mean = op_call(g.graph, torch.ops.memfit.reduce_mean.default, grad=a.grad, dst=owner,
                                   group=self.process_group, world=self.world, name=f"the gradient of {f}")
                mean.meta["val"] = a.grad.meta["val"].new_empty(a.grad.meta["val"].shape)
                upd.args, upd.kwargs = replace_args(upd, grad=mean)
                at = upd
                sent += sum(_nbytes(p) for p in written)
            else:
                with g.graph.inserting_before(upd):
                    op_call(g.graph, torch.ops.memfit.reduce_send_.default, grad=a.grad, dst=owner,
                            group=self.process_group, world=self.world, name=f"the gradient of {f}")
                at = upd.prev
            for p in written:  # the owner's new values of every parameter tensor the update wrote
                with g.graph.inserting_after(at):
                    at = op_call(g.graph, torch.ops.memfit.broadcast_.default, t=p, src=owner, group=self.process_group,
                                 name=f"the parameter {p.meta[NAME_KEY]}")
            g.updates[f] = at  # what writes the parameter last: its broadcast, else the owner's update
            if owner != self.group_rank:
                g.graph.erase_node(upd)
                for s in state:
                    if not s.users:
                        g.remove_state(s.meta[NAME_KEY])
        return {"owners": owners, "update_ops": kinds, "state_bytes_here": mine_state, "state_bytes_all": all_state,
                "broadcast_bytes_per_step": sent}

    def _shard_buckets(self, g: TrainGraph, items: list, owners: dict, kinds: dict, broadcast: bool) -> dict:
        """``_shard_state`` with buckets, overlapped: in backward order, each bucket's gradients (grouped by
        owner) are reduced onto their owners by ``memfit::reduce_start`` (one async reduce per owner's run),
        waited for (``memfit::bucket_wait``) once the next bucket has started; the owner's updates then run
        on views of the bucket, and (``broadcast``) every parameter tensor they wrote is broadcast from its
        owner with ``memfit::broadcast_start_``, left running until ``memfit::broadcasts_wait`` at the end
        of the step. Every rank issues the same collectives in the same order (the buckets, then each
        bucket's broadcasts in its order)."""
        groups = [sorted(grp, key=lambda fu: owners[fu[0]]) for grp in self._groups(g, items)]
        starts = self._start_buckets(g, groups, torch.ops.memfit.reduce_start.default,
                                     owners=lambda grp: [owners[f] for f, _ in grp])
        sent = mine_state = all_state = 0
        sent_params: list = []
        for k, (grp, start) in enumerate(zip(groups, starts, strict=True)):
            at, off = self._wait_after_next(g, starts, k), 0
            for f, upd in grp:
                owner, (state, state_bytes, written) = owners[f], _sharded_update(g, f, upd, broadcast)
                all_state += state_bytes
                if owner == self.group_rank:
                    mine_state += state_bytes
                    off = self._read_from(g, start, at, upd, off)
                    at = upd
                    sent += sum(_nbytes(x) for x in written)
                else:
                    off += args_of(upd).grad.meta["val"].numel()
                for x in written:
                    with g.graph.inserting_after(at):
                        at = op_call(g.graph, torch.ops.memfit.broadcast_start_.default, t=x, src=owner,
                                     group=self.process_group, name=f"the parameter {x.meta[NAME_KEY]}")
                    sent_params.append(x)
                g.updates[f] = at  # what writes the parameter last here: its broadcast, else the owner's update
                if owner != self.group_rank:
                    g.graph.erase_node(upd)
                    for x in state:
                        if not x.users:
                            g.remove_state(x.meta[NAME_KEY])
        if sent_params:
            out = next(n for n in reversed(g.graph.nodes) if n.op == "output")
            with g.graph.inserting_before(out):
                done = op_call(g.graph, torch.ops.memfit.broadcasts_wait.default, ts=sent_params,
                               group=self.process_group)
            done.meta["val"] = None
            for f, upd in list(g.updates.items()):  # what writes a broadcast parameter last: the final wait
                if upd.target is torch.ops.memfit.broadcast_start_.default:
                    g.updates[f] = done
        return {"owners": owners, "update_ops": kinds, "state_bytes_here": mine_state, "state_bytes_all": all_state,
                "broadcast_bytes_per_step": sent, "buckets": len(groups), "bucketed": len(items)}


    def _shard_params(self, g: TrainGraph, owners: dict[str, int]) -> dict:
        """FSDP-style: a parameter lives on its owner only. Every other rank receives it before its first read
        in the forward and again before its first read after the loss (the backward, recomputations included);
        each fetched copy dies after its last reader. The fetches, in the order of their first readers, are
        prefetched one ahead: ``memfit::fetch_start`` (the owner: ``memfit::lend_start_``, in the same place)
        starts the broadcast before the previous fetch's wait, ``memfit::fetch_wait_`` finishes it just before
        the first reader, so one fetch is on the wire while the step computes with the one before (the plan
        counts the copy from its start; ``prefetch=False`` starts each where it is waited for). No broadcast
        follows the owner's update: the next step fetches."""
        if g.tied:
            raise ConfigError(where_what_got(f"{_WHERE}.shard", "a model without tied weights for shard='params'",
                                             f"tied {sorted(g.tied)}", "use shard='state'"))
        order = {n: i for i, n in enumerate(g.graph.nodes)}
        at_loss = order[g.loss]
        fetches, fetched = 0, 0
        points = []  # (first reader, fqn, readers, late views to rebuild): one fetch each, in the step's order
        for f in owners:
            p = g.params[f]
            readers = sorted((u for u in p.users if u is not g.updates.get(f)), key=order.__getitem__)
            early = [u for u in readers if order[u] < at_loss]
            # views made in the forward and read after the loss (t(W) for the input's gradient): the backward
            # reads a copy of the view made on the backward's fetch, so the forward's copy dies in the forward
            late_views = [v for v in _view_tree([u for u in early if u.args and u.args[0] is p], order, at_loss)
                          if any(order[w] > at_loss for w in v.users)]
            late = sorted({*(u for u in readers if order[u] > at_loss),
                           *(w for v in late_views for w in v.users if order[w] > at_loss)}, key=order.__getitem__)
            points += [(half[0], f, half, views) for half, views in ((early, []), (late, late_views)) if half]
        points.sort(key=lambda pt: order[pt[0]])  # stable: owners' order among fetches before one reader
        waits = []
        for first, f, half, views in points:
            owner = owners[f]
            p, mine, val = g.params[f], owner == self.group_rank, g.params[f].meta["val"]
            # started one fetch ahead: before the previous fetch's wait (the first, before its own reader)
            with g.graph.inserting_before(waits[-1] if waits and self.prefetch else first):
                if mine:
                    op_call(g.graph, torch.ops.memfit.lend_start_.default, t=p, src=owner, group=self.process_group,
                            name=f"the parameter {f}")
                    got = p
                else:
                    got = op_call(g.graph, torch.ops.memfit.fetch_start.default, shape=list(val.shape),
                                  dtype=val.dtype, device=val.device, src=owner, group=self.process_group,
                                  name=f"the parameter {f}")
                    got.meta["val"] = val
            with g.graph.inserting_before(first):
                waits.append(op_call(g.graph, torch.ops.memfit.fetch_wait_.default, t=got))
            waits[-1].meta["val"] = None
            if mine:
                continue
            if views:
                _rebuild_views(g, got, views, order, at_loss)
            for u in half:
                u.replace_input_with(p, got)
            fetches += 1
            fetched += _nbytes(p)
        for f, owner in owners.items():
            if owner != self.group_rank:  # neither the parameter nor its update is this rank's
                g.updates.pop(f, None)
                g.trainable = tuple(x for x in g.trainable if x != f)
                g.graph.erase_node(g.params.pop(f))
        return {"fetches": fetches, "fetched_bytes_per_step": fetched,
                "param_bytes_here": sum(_nbytes(g.params[f]) for f, o in owners.items() if o == self.group_rank)}


def _view_tree(roots, order: dict, at_loss: int) -> list:
    """``roots`` that are view ops and the views of them made before the loss, transitively (parents first)."""
    out, stack = [], [r for r in roots if is_view_op(r)]
    while stack:
        v = stack.pop(0)
        out.append(v)
        stack.extend(u for u in v.users if is_view_op(u) and u.args and u.args[0] is v and order[u] < at_loss)
    return out


def _rebuild_views(g: TrainGraph, src, views: list, order: dict, at_loss: int) -> None:
    """For each view (of the parameter, or of such a view) read after the loss: a copy of its chain from ``src``, placed
    before its first late reader, which the late readers then read instead."""
    copies, tree = {}, set(views)

    def copy_of(v):
        if v in copies:
            return copies[v]
        parent = v.args[0]  # the parameter (or the forward's fetch of it by now), or a view in the tree
        base = copy_of(parent) if parent in tree else src
        first = min((w for w in v.users if order[w] > at_loss), key=order.__getitem__, default=None)
        anchor = first if first is not None and order[first] > order.get(base, -1) else base.next
        with g.graph.inserting_before(anchor):
            c = g.graph.node_copy(v, lambda n: base if n is parent else n)
        c.meta = dict(v.meta)
        order[c] = order[anchor] - 0.5
        copies[v] = c
        return c

    for v in views:
        late = [w for w in v.users if order[w] > at_loss]
        c = copy_of(v)
        for w in late:
            w.replace_input_with(v, c)


def _sharded_update(g: TrainGraph, f: str, upd, broadcast: bool) -> tuple[list, int, list]:
    """An update in a sharded step: its optimizer state, that state's bytes, and the weights its owner
    broadcasts after it (none without ``broadcast``, where it must write its own parameter only)."""
    state = _state_of(g, upd)
    written = _written_params(g, upd)
    if not broadcast and written != [g.params.get(f)]:
        raise ConfigError(where_what_got(f"{_WHERE}.shard", "updates that write their own parameter only for "
                                         "shard='params'", f"the update of {f} writes "
                                         f"{[w.meta[NAME_KEY] for w in written]}",
                                         "use shard='state' with encoded weights or channel subsets"))
    return state, sum(_nbytes(x) for x in state), written if broadcast else []


def _movable(upd, order: dict) -> bool:
    """Whether ``upd`` may run anywhere later in the step: nothing reads its output, nor anything it writes
    (through any view) after it (``order``: the graph's node positions; nodes added since count as after)."""
    if upd.users:
        return False
    return not any(order.get(u, len(order)) > order[upd] for x in _written_nodes(upd) for a in _aliases_of(x)
                   for u in a.users if u is not upd)


def _written_nodes(upd) -> list:
    """The nodes an op mutates (its written arguments, as passed: views included)."""
    out = []
    for arg, val in zip(upd.target._schema.arguments, [*upd.args, *[upd.kwargs.get(a.name) for a in
                                                                       upd.target._schema.arguments[len(upd.args):]]],
                        strict=True):
        if arg.alias_info is not None and arg.alias_info.is_write and val is not None:
            out.append(val)
    return out


def _aliases_of(n) -> list:
    """Every node sharing ``n``'s storage: its root and all views of the root."""
    return aliases(storage_root(n))


def _nbytes(n) -> int:
    v = n.meta["val"]
    return v.numel() * v.element_size()


def _is_weight(g: TrainGraph, n) -> bool:
    """A parameter placeholder, or state that is part of a weight (INT8 weights' scales, kind "weight")."""
    role = n.meta.get(ROLE_KEY)
    return role == "param" or (role == "state" and g.state_specs[n.meta[NAME_KEY]].kind == "weight")


def _state_of(g: TrainGraph, upd) -> list:
    """The optimizer state an update op reads (its moments, projector, schedule, accumulator): not weights."""
    return [x for x in upd.all_input_nodes if x.meta.get(ROLE_KEY) == "state" and not _is_weight(g, x)]


def _written_params(g: TrainGraph, upd) -> list:
    """The weight placeholders an update op writes (its mutated arguments, through views): the parameter, or
    an INT8 weight's codes and scales."""
    out = []
    for arg, val in zip(upd.target._schema.arguments, [*upd.args, *[upd.kwargs.get(a.name) for a in
                                                                       upd.target._schema.arguments[len(upd.args):]]],
                        strict=True):
        if arg.alias_info is None or not arg.alias_info.is_write or val is None:
            continue
        while val.op != "placeholder" and is_view_op(val):
            val = val.args[0]
        if val.op == "placeholder" and _is_weight(g, val) and val not in out:
            out.append(val)
    return out


def owner_table(g: TrainGraph, world: int) -> dict[str, int]:
    """Parameter FQN -> the rank that keeps its optimizer state: largest state first (then the parameter's
    bytes, then its name), each to the rank holding the fewest state bytes so far (then the lowest rank).
    Deterministic: every rank computes the same table from the same step."""
    sizes = {}
    for f, upd in g.updates.items():
        if args_of(upd).grad is None:
            continue
        param = g.params.get(f)
        sizes[f] = (sum(_nbytes(s) for s in _state_of(g, upd)), _nbytes(param) if param is not None else 0)
    load = [0] * world
    owners = {}
    for f in sorted(sizes, key=lambda k: (-sizes[k][0], -sizes[k][1], k)):
        r = min(range(world), key=lambda i: (load[i], i))
        owners[f] = r
        load[r] += sizes[f][0] or sizes[f][1]
    return owners


def _projectable(upd) -> bool:
    """A GaLore update (``rule="galore"``, a stored fp32 orthonormal projector: ``svd`` or ``randomized``,
    one micro-step) of an fp32 gradient: it reads the gradient only through its projection ``P^T G``, so the
    ranks may average that instead. APOLLO and Fira step the full gradient (scaled, or its residual): not."""
    if upd.target is not torch.ops.memfit.lowrank_update.default:
        return False
    a = args_of(upd)
    d = a.as_dict()
    fp32 = all(x is None or x.meta["val"].dtype == torch.float32 for x in (a.grad, a.grad_right))
    return (d["rule"] == "galore" and d["projector"] in ("svd", "randomized") and d["proj_bits"] == 32
            and a.proj is not None and d.get("micro_steps", 1) <= 1 and fp32)
