"""se3nb.equivariance: the checks the whole suite relies on must detect what they are meant to detect."""

import torch

from se3nb.equivariance import equivariance_error, random_rotation, rotate_features, translation_error


def test_equivariance_error_is_zero_for_an_equivariant_map_and_large_for_others():
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(6, 3, generator=g, dtype=torch.float64)
    feats = {
        0: torch.randn(6, 2, 1, generator=g, dtype=torch.float64),
        1: torch.randn(6, 2, 3, generator=g, dtype=torch.float64),
    }

    def equivariant(p, f):  # degree 1 out: the degree-1 input scaled by an invariant
        return {0: f[0] * p.norm(dim=-1)[:, None, None], 1: f[1] * f[0]}

    def broken(p, f):  # adds a fixed direction: not equivariant
        return {1: f[1] + torch.tensor([1.0, 0, 0], dtype=torch.float64)}

    assert equivariance_error(equivariant, pos, feats, num_rotations=4).max() < 1e-12
    assert equivariance_error(broken, pos, feats, num_rotations=4).min() > 1e-2
    assert translation_error(lambda p, f: {0: (p - p.mean(0)).norm(dim=-1)[:, None, None]}, pos, feats) < 1e-12
    assert translation_error(lambda p, f: {0: p.norm(dim=-1)[:, None, None]}, pos, feats) > 1e-2


def test_random_rotations_are_rotations_and_rotate_features_uses_them():
    g = torch.Generator().manual_seed(1)
    R = random_rotation(generator=g)
    torch.testing.assert_close(R @ R.T, torch.eye(3, dtype=torch.float64), atol=1e-12, rtol=0)
    assert abs(torch.linalg.det(R).item() - 1) < 1e-12
    v = torch.randn(4, 1, 3, dtype=torch.float64)
    torch.testing.assert_close(rotate_features({1: v}, R)[1], v @ R.T, atol=1e-12, rtol=0)  # D_1 = R in e3nn's basis
    assert torch.equal(rotate_features({0: v[..., :1]}, R)[0], v[..., :1])
