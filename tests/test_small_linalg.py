"""The unrolled small-matrix Cholesky against torch.linalg."""

import pytest
import torch

from gradfit.batch.linalg import cholesky, cholesky_inverse


@pytest.mark.parametrize("P", [1, 2, 3, 4, 6, 10])
def test_factor_and_inverse_match_torch_linalg(P):
    g = torch.Generator().manual_seed(P)
    J = torch.randn(50, 3 * P, P, generator=g, dtype=torch.float64)
    A = J.transpose(-1, -2) @ J
    L, ok = cholesky(A)
    assert ok.all()
    zero = torch.zeros(50, dtype=torch.float64)
    factor = torch.stack(
        [torch.stack(row + [zero] * (P - len(row)), dim=-1) for row in L], dim=-2
    )  # the nested lower-triangular rows as [50, P, P]
    torch.testing.assert_close(factor, torch.linalg.cholesky(A), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(cholesky_inverse(L), torch.linalg.inv(A), rtol=1e-9, atol=1e-10)


def test_not_positive_definite_is_flagged_per_matrix():
    A = torch.stack([torch.eye(3, dtype=torch.float64), torch.zeros(3, 3, dtype=torch.float64)])
    A[1, 0, 0] = 1.0
    _, ok = cholesky(A)
    assert ok.tolist() == [True, False]
