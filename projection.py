"""The math of low-rank gradient projection: projectors, projection, update rules (plain torch).

Conventions for one weight gradient ``G`` of shape (m, n): the projector ``P`` has orthonormal-ish
columns and projects the *smaller* side, as galore-torch does: ``side="left"`` when m < n, P is
(m, r) and the projected gradient is ``R = P^T G`` (r, n); otherwise ``side="right"``, P is (n, r)
and ``R = G P`` (m, r). ``project_back`` maps an (r, n) / (m, r) matrix back to (m, n).

``G`` may be given as factors ``(L, Rm)`` with ``G = L @ Rm`` (a Linear weight's gradient is
``dY^T X``): every function here that can avoid forming G does, so a projected step on a Linear
layer never holds the (m, n) gradient (the svd and dct projectors still form it on refresh steps).

Projectors (``refresh``):
  - ``svd``: the top-r singular vectors of G (GaLore).
  - ``randomized``: a randomized range finder with one power iteration, ``r + 8`` probes drawn from
    a seeded generator (no full SVD; works on factors).
  - ``dct``: the r rows of the orthonormal DCT-II basis with the largest l1 coefficient mass; only
    the r indices are stored, the basis is shared per size.
  - ``random``: a Gaussian N(0, 1/r) matrix regenerated from ``(seed, refresh count)`` (APOLLO);
    nothing is stored.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

Side = Literal["left", "right"]
Grad = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def side_of(shape: tuple[int, ...] | torch.Size) -> Side:
    m, n = shape
    return "left" if m < n else "right"


def proj_shape(shape, rank: int) -> tuple[int, int]:
    m, n = shape
    return (m, rank) if side_of(shape) == "left" else (n, rank)


def low_shape(shape, rank: int) -> tuple[int, int]:
    """Shape of the projected gradient R (and of the low-rank moments)."""
    m, n = shape
    return (rank, n) if side_of(shape) == "left" else (m, rank)


def full(G: Grad) -> torch.Tensor:
    """A fresh fp32 copy of the (m, n) gradient (materialized when given as factors); callers may
    modify it in place."""
    if isinstance(G, tuple):
        L, Rm = G
        return L.float() @ Rm.float()
    return G.to(torch.float32, copy=True)


def mm(G: Grad, X: torch.Tensor) -> torch.Tensor:
    """G @ X without forming G."""
    if isinstance(G, tuple):
        L, Rm = G
        return L.float() @ (Rm.float() @ X)
    return G.float() @ X


def rmm(Y: torch.Tensor, G: Grad) -> torch.Tensor:
    """Y @ G without forming G."""
    if isinstance(G, tuple):
        L, Rm = G
        return (Y @ L.float()) @ Rm.float()
    return Y @ G.float()


def transpose(G: Grad) -> Grad:
    if isinstance(G, tuple):
        L, Rm = G
        return (Rm.t(), L.t())
    return G.t()


def project(G: Grad, P: torch.Tensor, side: Side) -> torch.Tensor:
    return rmm(P.t(), G) if side == "left" else mm(G, P)


def project_back(N: torch.Tensor, P: torch.Tensor, side: Side) -> torch.Tensor:
    return P @ N if side == "left" else N @ P.t()


def _oriented(G: Grad, side: Side) -> Grad:
    """G oriented so the projector spans its columns' space (left) — i.e. G^T for the right side."""
    return G if side == "left" else transpose(G)


def svd_projector(G: torch.Tensor, rank: int, side: Side) -> torch.Tensor:
    """Top-``rank`` singular vectors of the fp32 gradient ``G`` on ``side`` (G is not modified)."""
    U, _, _ = torch.linalg.svd(G if side == "left" else G.t(), full_matrices=False)
    return U[:, :rank].contiguous()


def randomized_projector(G: Grad, rank: int, side: Side, generator: torch.Generator, oversample: int = 8,
                         power_iters: int = 1) -> torch.Tensor:
    A = _oriented(G, side)
    rows = A[0].shape[0] if isinstance(A, tuple) else A.shape[0]
    cols = A[1].shape[1] if isinstance(A, tuple) else A.shape[1]
    k = min(rank + oversample, rows, cols)
    omega = torch.randn(cols, k, generator=generator, device=generator.device)
    omega = omega.to(_device(A))
    Q, _ = torch.linalg.qr(mm(A, omega))
    for _ in range(power_iters):
        Z, _ = torch.linalg.qr(rmm(Q.t(), A).t())
        Q, _ = torch.linalg.qr(mm(A, Z))
    B = rmm(Q.t(), A)  # (k, cols)
    Ub, _, _ = torch.linalg.svd(B, full_matrices=False)
    return (Q @ Ub[:, :rank]).contiguous()


def _device(G: Grad) -> torch.device:
    return G[0].device if isinstance(G, tuple) else G.device


def dct_matrix(size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Orthonormal DCT-II basis, one basis vector per row: Q @ Q.T == I."""
    i = torch.arange(size, dtype=torch.float64)
    k = i[:, None]
    Q = torch.cos(math.pi * (i[None, :] + 0.5) * k / size) * math.sqrt(2.0 / size)
    Q[0] *= math.sqrt(0.5)
    return Q.to(device=device, dtype=torch.float32)


def dct_indices(G: Grad, rank: int, side: Side, Q: torch.Tensor) -> torch.Tensor:
    """The ``rank`` DCT basis rows carrying the most l1 mass of G's columns (left) / rows (right)."""
    coeff = rmm(Q, _oriented(G, side))  # (size, other)
    score = coeff.abs().sum(dim=1)
    return torch.topk(score, rank, sorted=True).indices


def dct_projector(Q: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return Q.index_select(0, idx).t().contiguous()


SEED_SCHEMES = ("memfit", "apollo-torch")


def random_projector(shape, rank: int, seed: int, count: int, device, scheme: str = "memfit") -> torch.Tensor:
    """APOLLO's Gaussian projector N(0, 1/r), a pure function of (seed, refresh count).

    ``scheme="apollo-torch"`` draws the matrices apollo-torch draws on CPU for a parameter whose projector
    seed is ``seed`` (its 1-based index in that optimizer): refresh k seeds a CPU generator with the seed
    advanced k times (each advance: the last of 15 int64 draws from a generator seeded with the previous
    seed) and draws (m, r) for the left side, (r, n) transposed for the right. For reproducing an
    apollo-torch run, and for comparing the two like for like (tests/test_lowrank.py, bench/optimizers.py).
    """
    rows = proj_shape(shape, rank)[0]
    gen = torch.Generator(device="cpu")
    if scheme == "apollo-torch":
        for _ in range(count):
            gen.manual_seed(seed)
            seed = int(torch.randint(0, torch.iinfo(torch.int64).max, (15,), generator=gen)[-1])
        gen.manual_seed(seed)
        if side_of(shape) == "left":
            P = torch.randn(rows, rank, generator=gen)
        else:
            P = torch.randn(rank, rows, generator=gen).t().contiguous()
        return P.div_(math.sqrt(rank)).to(device)
    gen.manual_seed(_mix(seed, count))
    P = torch.randn(rows, rank, generator=gen) / math.sqrt(rank)
    return P.to(device)


def seeded_generator(seed: int, count: int) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(_mix(seed, count))
    return gen


def _mix(seed: int, count: int) -> int:
    return (seed * 1_000_003 + count * 7_919 + 12_345) % (2**63 - 1)


def rotate_moments(exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor, P_old: torch.Tensor, P_new: torch.Tensor,
                   side: Side) -> None:
    """Carry the moments into the new subspace: m' = C m, v' = (C∘C) v with C = P_new^T P_old."""
    C = P_new.t() @ P_old
    C2 = C * C
    if side == "left":
        exp_avg.copy_(C @ exp_avg)
        exp_avg_sq.copy_((C2 @ exp_avg_sq).clamp_(min=0))
    else:
        exp_avg.copy_(exp_avg @ C.t())
        exp_avg_sq.copy_((exp_avg_sq @ C2.t()).clamp_(min=0))


def channel_norm_ratio(N: torch.Tensor, R: torch.Tensor, side: Side, mode: str) -> torch.Tensor:
    """APOLLO / Fira scaling: ||N|| / ||R|| per channel (the unprojected dim) or for the whole tensor.

    Returned shaped to broadcast against the (m, n) gradient.
    """
    if mode == "tensor":
        return torch.linalg.vector_norm(N) / (torch.linalg.vector_norm(R) + 1e-8)
    dim = 0 if side == "left" else 1
    ratio = torch.linalg.vector_norm(N, dim=dim) / (torch.linalg.vector_norm(R, dim=dim) + 1e-8)
    return ratio[None, :] if side == "left" else ratio[:, None]


def limit_growth(update: torch.Tensor, prev_norm: float, gamma: float) -> tuple[torch.Tensor, float]:
    """Norm-growth limiter: if ||u_t|| / ||u_{t-1}|| > gamma, scale u_t to gamma * ||u_{t-1}||."""
    norm = float(torch.linalg.vector_norm(update))
    if prev_norm > 0 and norm > gamma * prev_norm:
        update = update * (gamma * prev_norm / norm)
        norm = gamma * prev_norm
    return update, norm


# ---- int4 storage of the projection (Q-GaLore) ---------------------------------------------------

INT4_GROUP = 256


def int4_shapes(shape: tuple[int, int]) -> tuple[tuple[int], tuple[int, int]]:
    numel = shape[0] * shape[1]
    return ((numel + 1) // 2,), (2, -(-numel // INT4_GROUP))


def quantize_int4(P: torch.Tensor, pack) -> tuple[torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of 256: q = round((x - min) / step), step = (max - min) / 15.

    The zero point is the group's own minimum, not clamped into a signed range, so a group whose
    values all share a sign keeps its full 16 levels. Returns (packed uint8, [min; step] fp32).
    """
    flat = P.reshape(-1).float()
    pad = (-flat.numel()) % INT4_GROUP
    groups = torch.cat([flat, flat[-1:].expand(pad)]).view(-1, INT4_GROUP)  # pad with a value the group has
    lo = groups.amin(dim=1)
    hi = groups.amax(dim=1)
    step = (hi - lo) / 15
    step = torch.where(step > 0, step, torch.ones_like(step))
    q = torch.round((groups - lo[:, None]) / step[:, None]).clamp_(0, 15).to(torch.uint8).reshape(-1)
    return pack(q[: flat.numel()].contiguous()), torch.stack([lo, step])


def dequantize_int4(packed: torch.Tensor, meta: torch.Tensor, shape: tuple[int, int], unpack) -> torch.Tensor:
    numel = shape[0] * shape[1]
    q = unpack(packed, numel).float()
    pad = (-numel) % INT4_GROUP
    q = torch.nn.functional.pad(q, (0, pad)).view(-1, INT4_GROUP)
    return (q * meta[1][:, None] + meta[0][:, None]).reshape(-1)[:numel].view(shape)


def refresh_bytes(shape: tuple[int, int], rank: int, projector: str) -> int:
    """Bytes a subspace refresh of an (m, n) weight allocates on top of a normal step, the peak of its
    temporaries: the one figure the lowrank pass reports to the planner and the lowering plans with.

    svd: the fp32 gradient, U (rows x k), S and Vh (k x other) from LAPACK, and the new projector;
    randomized: the sketch, its QR and the small SVD at oversampling 8; dct: the fp32 gradient and its
    transform; random: the regenerated projector."""
    m, n = shape
    k = min(m, n)
    rows = proj_shape((m, n), rank)[0]
    full = 4 * m * n
    if projector == "svd":
        return full + 4 * (rows * k + k * (m + n - rows) + rows * rank)
    if projector == "randomized":
        p = min(rank + 8, k)
        return 4 * (3 * (m + n) * p + p * p)
    if projector == "dct":
        return 2 * full
    return 4 * rows * rank
