"""se3nb.basis: Wigner D matrices, Clebsch-Gordan coefficients and the equivariant kernel basis."""

import pytest
import torch
from e3nn import o3

from se3nb.basis import Bases, basis_equivariance_error, clebsch_gordan, spherical_harmonics, wigner_D


def test_wigner_D_is_e3nn_s_representation_and_a_homomorphism():
    R = o3.rand_matrix(6, dtype=torch.float64)
    Ds = wigner_D(R, 4)
    for l, D in enumerate(Ds):
        expected = o3.Irrep(l, (-1) ** l).D_from_matrix(R)  # [6, 2l+1, 2l+1], through Euler angles: ~1e-7 accurate
        torch.testing.assert_close(D, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(wigner_D(R[0] @ R[1], l)[l], D[0] @ D[1], atol=1e-10, rtol=0)
    assert [D.shape for D in wigner_D(R.reshape(2, 3, 3, 3), 2)] == [(2, 3, 1, 1), (2, 3, 3, 3), (2, 3, 5, 5)]


def test_spherical_harmonics_rotate_with_wigner_D():
    g = torch.Generator().manual_seed(0)
    r, R = torch.randn(50, 3, generator=g, dtype=torch.float64), o3.rand_matrix(dtype=torch.float64)
    Y, Y_rot, Ds = spherical_harmonics(r, 3), spherical_harmonics(r @ R.T, 3), wigner_D(R, 3)
    for J in range(4):
        block = slice(J * J, (J + 1) ** 2)
        torch.testing.assert_close(Y_rot[:, block], Y[:, block] @ Ds[J].T, atol=1e-10, rtol=0)


def test_kernel_basis_is_equivariant_and_clebsch_gordan_checks_its_degrees():
    assert basis_equivariance_error(max_degree=2, num_rotations=3).max() < 1e-10
    assert clebsch_gordan(2, 1, 1).shape == (3, 3, 5)
    with pytest.raises(ValueError, match="J=3 does not couple degrees 1 and 1: need 0 <= J <= 2"):
        clebsch_gordan(3, 1, 1)


def test_bases_shapes():
    bases = Bases(torch.randn(7, 3, dtype=torch.float64), 2)
    assert bases.num_edges == 7 and bases.max_degree == 2
    W = bases.get((1,), (2,))
    assert W.shape[0] == 7 and W.shape[1] == 3 and W.shape[-1] == 5
