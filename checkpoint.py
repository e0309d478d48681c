"""Checkpoints of data-parallel and sharded Trainers: one file per rank plus a manifest, loadable at any world size.

``save_checkpoint(trainer, path)`` is called on every rank of the trainer's process group (or once, for a
Trainer on one process). It writes into the directory ``path``:

- ``rank{r}.pt`` from each rank ``r``: the optimizer state that rank holds (all of it when the state is
  replicated, its own parameters' with ``shard="state"`` or ``"params"``) and its RNG state; rank 0's file
  also holds the buffers and the parameters (identical on every rank after a step), or with
  ``shard="params"`` each rank's file the parameters it owns;
- ``manifest.json`` from rank 0: the format, the world size, the step, the passes, and for every state
  tensor and parameter the rank whose file holds it.

Every rank waits (a barrier) until all files are written. ``load_checkpoint(trainer, path)`` rebuilds the
state dict the trainer's own ``Trainer.state_dict`` would have, whatever the world size it was saved at:
each state tensor and parameter is read from the file the manifest names (files opened memory-mapped, so a
rank reads only the tensors it needs), the buffers from rank 0's, the RNG state from the same rank's
file when that rank existed, else rank 0's. Then ``Trainer.load_state_dict`` checks every name, shape and
dtype before it copies anything: a checkpoint that does not match changes nothing. Same world size and
passes: the resume is bit-identical. Another world size: the same weights and optimizer state, so the
same losses up to the reduction order of the new world.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, where_what_got

MANIFEST = "manifest.json"
FORMAT = "memfit.checkpoint/1"


def _rank_world(trainer) -> tuple[int, int, Any]:
    group = getattr(trainer, "_dp_group", None)
    if group is None:
        return 0, 1, None
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import _resolve_process_group

    pg = _resolve_process_group(group[0])
    return dist.get_rank(pg), group[1], pg


def save_checkpoint(trainer, path: str | Path) -> Path:
    """Write ``trainer``'s checkpoint into the directory ``path`` (see the module doc); call it on every rank.
    Returns the directory."""
    path = Path(path)
    rank, world, pg = _rank_world(trainer)
    sd = trainer.state_dict()
    sharded_params = trainer.graph.info.get("data_parallel", {}).get("shard") == "params"
    mine = {"format": FORMAT, "rank": rank, "state": sd["state"], "rng": sd["rng"]}
    if rank == 0 or sharded_params:  # replicated parameters once, from rank 0; sharded ones from each owner
        mine["params"] = sd["params"]
    if rank == 0:
        mine["buffers"] = sd["buffers"]
    names = (list(sd["state"]), list(mine.get("params", ())))
    if pg is not None:
        import torch.distributed as dist

        every: list = [None] * world
        dist.all_gather_object(every, names, group=pg)
    else:
        every = [names]
    path.mkdir(parents=True, exist_ok=True)
    torch.save(mine, path / f"rank{rank}.pt")
    if rank == 0:
        where, params = {}, {}
        for r, (state, held) in enumerate(every):
            for name in state:
                where.setdefault(name, r)
            for name in held:
                params.setdefault(name, r)
        manifest = {"format": FORMAT, "world": world, "step": sd["step"], "skipped_steps": sd["skipped_steps"],
                    "passes": [p for p in sd["passes"] if p != "data_parallel"],
                    "shard": trainer.graph.info.get("data_parallel", {}).get("shard", "none"), "state": where,
                    "params": params}
        (path / MANIFEST).write_text(json.dumps(manifest, indent=1))
    if pg is not None:
        import torch.distributed as dist

        dist.barrier(group=pg)
    return path


def load_checkpoint(trainer, path: str | Path) -> None:
    """Load what ``save_checkpoint`` wrote, saved at any world size, into ``trainer`` (see the module doc)."""
    path = Path(path)
    where = f"memfit.load_checkpoint({str(path)!r})"
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(where_what_got(where, f"a directory with {MANIFEST}", f"{type(e).__name__}: {e}",
                                         "pass the directory memfit.save_checkpoint wrote")) from e
    if manifest.get("format") != FORMAT:
        raise ConfigError(where_what_got(f"{where}: {MANIFEST}", f"format {FORMAT!r}", repr(manifest.get("format")),
                                         "pass the directory memfit.save_checkpoint wrote"))
    rank, _, _ = _rank_world(trainer)
    files: dict[int, dict] = {}

    def read(r: int) -> dict:
        if r not in files:
            f = path / f"rank{r}.pt"
            if not f.exists():
                raise ConfigError(where_what_got(where, f"rank{r}.pt (saved by rank {r} of {manifest['world']})",
                                                 "no such file", "copy every rank's file with the manifest"))
            files[r] = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
        return files[r]

    mine = trainer.executor.state
    missing = [k for k in mine if k not in manifest["state"]] + [
        k for k in trainer.executor.params if k not in manifest["params"]]
    if missing:
        raise ConfigError(where_what_got(where, "every optimizer state tensor this Trainer holds",
                                         f"{len(missing)} missing, e.g. {missing[:3]}",
                                         "build the Trainer with the passes and settings of the saved run "
                                         f"(saved with passes {manifest['passes']})"))
    passes = [p for p in trainer.graph.applied if p != "data_parallel"]
    if passes != manifest["passes"]:
        raise ConfigError(where_what_got(where, f"a checkpoint saved with passes {passes}", manifest["passes"],
                                         "build the Trainer with the same passes (data_parallel aside)"))
    root = read(0)
    sd = {"format": _state_format(), "step": manifest["step"],
          "skipped_steps": manifest["skipped_steps"], "passes": list(trainer.graph.applied),
          "params": {k: read(manifest["params"][k])["params"][k] for k in trainer.executor.params},
          "buffers": root["buffers"],
          "state": {k: read(manifest["state"][k])["state"][k] for k in mine},
          "rng": read(rank if rank < manifest["world"] else 0)["rng"]}
    trainer.load_state_dict(sd)


def _state_format() -> str:
    from .api import STATE_FORMAT

    return STATE_FORMAT
