"""Best rank-k approximations of a module's delta (Eckart-Young), numpy only.

A delta D (out, in) is given either as factors D = B @ A, B (out, R), A (R, in) (a LoRA, or several
concatenated), or densely (the result of TIES, DARE, magnitude pruning). The best rank-k
approximation in the Frobenius (and spectral) norm keeps the k largest singular values; its
relative error is sqrt(sum of the dropped s_i^2 / sum of all s_i^2).

- Factored: QR of B and of A.T, then the SVD of the small core Rb @ Ra.T, so D = (Qb u) s (Qa v).T
  exactly, and the (out, in) matrix is never formed: cost O((out + in) R^2).
- Dense: the eigen-decomposition of the Gram matrix of D's shorter side (float64), D_k = U_k U_k.T D.
  Faster than an SVD of D when only the top singular subspace is wanted.

Both return factors B_k (out, k), A_k (k, in) with D_k = B_k @ A_k, and a Truncation that reports
what was kept. `--rank K` keeps min(K, available) singular values; `--energy E` the smallest k whose
squared singular values reach the share E of the total.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import PolytoolError


@dataclass(frozen=True)
class Truncation:
    """What a rank-k approximation of one module's delta kept."""

    rank: int  # singular values kept (>= 1: a LoRA has rank >= 1; a zero delta keeps one zero)
    energy: float  # retained share of the squared singular values (1.0 for a zero delta)
    error: float  # relative Frobenius error ||D - D_k|| / ||D|| (0.0 for a zero delta)

    def as_dict(self) -> dict:
        return asdict(self)


def check_rank_options(rank: int | None, energy: float | None) -> None:
    """At most one of rank (an integer >= 1) and energy (a share in (0, 1])."""
    if rank is not None and energy is not None:
        raise PolytoolError("--rank and --energy are alternatives: give one of them")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise PolytoolError(f"--rank {rank!r}: expected an integer >= 1")
    if energy is not None and not (isinstance(energy, (int, float)) and 0 < energy <= 1):
        raise PolytoolError(f"--energy {energy!r}: expected a share in (0, 1], e.g. 0.99")


def choose_rank(sq: np.ndarray, rank: int | None, energy: float | None) -> Truncation:
    """sq: squared singular values, descending, >= 0 -> how many to keep, and what that keeps."""
    cum = np.cumsum(sq)  # (p,)
    total = float(cum[-1]) if len(cum) else 0.0
    if total <= 0.0:
        return Truncation(1, 1.0, 0.0)
    if rank is not None:
        k = min(rank, len(sq))
    elif energy is not None:
        k = min(int(np.searchsorted(cum, energy * total, side="left")) + 1, len(sq))
    else:
        k = len(sq)
    dropped = float(np.sum(sq[k:]))
    return Truncation(k, float(cum[k - 1]) / total, math.sqrt(dropped / total))


def truncate_factored(B: np.ndarray, A: np.ndarray, rank: int | None = None,
                      energy: float | None = None) -> tuple[np.ndarray, np.ndarray, Truncation]:
    """D = B @ A, B (out, R), A (R, in) -> B_k (out, k), A_k (k, in), Truncation; D is never formed."""
    Qb, Rb = np.linalg.qr(B)  # (out, mb), (mb, R), mb = min(out, R)
    Qa, Ra = np.linalg.qr(A.T)  # (in, ma), (ma, R)
    u, s, vh = np.linalg.svd(Rb @ Ra.T, full_matrices=False)  # core (mb, ma) = u (mb, p) s (p,) vh (p, ma)
    info = choose_rank(s * s, rank, energy)
    k = info.rank
    B_k = (Qb @ u[:, :k]) * s[:k]  # (out, mb) @ (mb, k) -> (out, k), columns scaled by s
    A_k = vh[:k] @ Qa.T  # (k, ma) @ (ma, in) -> (k, in)
    return B_k, A_k, info


def truncate_dense(D: np.ndarray, rank: int | None = None,
                   energy: float | None = None) -> tuple[np.ndarray, np.ndarray, Truncation]:
    """D (out, in) -> B_k (out, k), A_k (k, in), Truncation, from the Gram matrix of D's shorter side."""
    D = np.asarray(D, dtype=np.float64)
    tall = D.shape[0] > D.shape[1]
    G = D.T @ D if tall else D @ D.T  # (in, in) or (out, out), symmetric
    w, V = np.linalg.eigh(G)  # ascending eigenvalues = squared singular values
    w, V = np.clip(w[::-1], 0.0, None), V[:, ::-1]  # descending
    info = choose_rank(w, rank, energy)
    Vk = V[:, : info.rank]
    if tall:
        return D @ Vk, Vk.T, info  # (out, in) @ (in, k) -> (out, k); (k, in)
    return Vk, Vk.T @ D, info  # (out, k); (k, out) @ (out, in) -> (k, in)
