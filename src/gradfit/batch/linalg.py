"""Cholesky factor and inverse of many small SPD matrices, unrolled over P.

LAPACK's batched routines pay microseconds per matrix; a million 3×3 or 4×4 normal-equation
systems are cheaper as a few dozen elementwise operations on ``[K]`` vectors, one per matrix
entry. Use for P up to about 10; beyond that call ``torch.linalg``.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor
MAX_P = 10


def cholesky(A: Tensor) -> tuple[list[list[Tensor]], Tensor]:
    """Lower factor ``L`` of ``A`` ``[..., P, P]`` as nested lists of ``[...]`` tensors, and ``ok``.

    ``ok`` is false where ``A`` is not (numerically) positive definite; ``L`` is then garbage.

    Example:
        >>> A = torch.tensor([[4.0, 2.0], [2.0, 3.0]])
        >>> L, ok = cholesky(A)
        >>> [[float(v) for v in row] for row in L], bool(ok)
        ([[2.0], [1.0, 1.4142135381698608]], True)
    """
    P = A.shape[-1]
    entries = [[A[..., i, j] for j in range(P)] for i in range(P)]
    L: list[list[Tensor]] = []
    ok = torch.ones(A.shape[:-2], dtype=torch.bool, device=A.device)
    for i in range(P):
        row: list[Tensor] = []
        for j in range(i + 1):
            s = entries[i][j]
            above = row if j == i else L[j]  # row j of L (the row being built when j == i)
            for k in range(j):
                s = s - row[k] * above[k]
            if i == j:
                ok &= s > 0
                row.append(torch.sqrt(s.clamp_min(torch.finfo(A.dtype).tiny)))
            else:
                row.append(s / L[j][j])
        L.append(row)
    return L, ok


def cholesky_inverse(L: list[list[Tensor]]) -> Tensor:
    """``(L Lᵀ)⁻¹`` ``[..., P, P]`` from the factor of :func:`cholesky`."""
    P = len(L)
    # W = L⁻¹ (lower triangular), then A⁻¹ = Wᵀ W
    W: list[list[Tensor]] = [[L[0][0]] * P for _ in range(P)]  # placeholders, read once set
    for j in range(P):
        W[j][j] = 1 / L[j][j]
        for i in range(j + 1, P):
            s = L[i][j] * W[j][j]
            for k in range(j + 1, i):
                s = s + L[i][k] * W[k][j]
            W[i][j] = -s / L[i][i]
    inv: list[list[Tensor]] = [[L[0][0]] * P for _ in range(P)]
    for i in range(P):
        for j in range(i, P):
            s = W[j][i] * W[j][j]  # k from j (W lower: W[k][i] needs k >= i, W[k][j] k >= j)
            for k in range(j + 1, P):
                s = s + W[k][i] * W[k][j]
            inv[i][j] = inv[j][i] = s
    return torch.stack([torch.stack(row, dim=-1) for row in inv], dim=-2)
