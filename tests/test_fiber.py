"""se3nb.fiber: the fiber as an immutable degree -> channels map, its sizes, e3nn Irreps, and the feature check."""

import pytest
import torch

from se3nb.fiber import Fiber, degree_to_dim


def test_a_fiber_is_a_sorted_immutable_map_without_empty_degrees():
    f = Fiber({2: 4, 0: 8, 1: 0})
    assert list(f) == [0, 2] and f.degrees == [0, 2] and f.channels == [8, 4] and len(f) == 2
    assert f[1] == 0 and 1 not in f and 2 in f and f.max_degree == 2 and Fiber({}).max_degree == -1
    assert f.dims == [1, 5] and f.num_features == 8 + 4 * 5
    assert f == {0: 8, 2: 4} and f == Fiber({0: 8, 2: 4, 3: 0}) and f != Fiber({0: 8})
    assert hash(f) == hash(Fiber({0: 8, 2: 4})) and len({f, Fiber({2: 4, 0: 8})}) == 1
    assert repr(f) == "Fiber({0: 8, 2: 4})" and [degree_to_dim(l) for l in range(3)] == [1, 3, 5]
    assert Fiber.create(3, 16) == Fiber({0: 16, 1: 16, 2: 16}) and isinstance(Fiber.create(1, 1), Fiber)
    assert f + {1: 2, 2: 1} == Fiber({0: 8, 1: 2, 2: 5}) and isinstance(f + f, Fiber)
    with pytest.raises(TypeError, match="dict"):
        Fiber([(0, 1)])
    with pytest.raises(ValueError, match="degree -1 with 3 channels"):
        Fiber({-1: 3})


def test_irreps_round_trip():
    f = Fiber({0: 3, 1: 2, 3: 1})
    assert str(f.to_irreps()) == "3x0e+2x1o+1x3o"
    assert Fiber.from_irreps(f.to_irreps()) == f and Fiber.from_irreps("2x1e+1x1o+4x0e") == Fiber({0: 4, 1: 3})


def test_check_accepts_exact_features_and_says_what_was_expected():
    f = Fiber({0: 2, 1: 3})
    good = {0: torch.zeros(5, 2, 1), 1: torch.zeros(5, 3, 3)}
    f.check(good)
    f.check(good, num=5)
    with pytest.raises(ValueError, match=r"x\[1\]: expected shape \[5, 3, 3\], got \[5, 3, 5\]"):
        f.check({**good, 1: torch.zeros(5, 3, 5)}, num=5, name='x')
    with pytest.raises(ValueError, match=r"features\[1\]: expected shape \[5, 3, 3\], got \[4, 3, 3\]"):
        f.check({**good, 1: torch.zeros(4, 3, 3)})  # N must agree across degrees
    with pytest.raises(ValueError, match=r"expected degrees \[0, 1\] \(fiber \{0: 2, 1: 3\}\), got \[0\]"):
        f.check({0: good[0]})
    with pytest.raises(TypeError, match="degree keys must be int, got '0'.*se3nb.nvidia"):
        f.check({'0': good[0], '1': good[1]})
    with pytest.raises(TypeError, match=r"features\[0\] must be a Tensor, got list"):
        f.check({0: [0.0], 1: good[1]})
    with pytest.raises(TypeError, match="must be a dict"):
        f.check([good[0], good[1]])
