"""ClassMeanAccumulator.update is all-or-nothing: a refused batch leaves the state untouched."""

import pytest
import torch

from hpd_fast.ops.class_mean_distance import ClassMeanAccumulator


def _state(acc):
    return [t.clone() for t in acc._sums], acc.counts.clone()


def test_update_refused_second_layer_changes_nothing():
    torch.manual_seed(0)
    acc = ClassMeanAccumulator(3)
    y = torch.tensor([0, 1, 2, 1])
    acc.update([torch.randn(4, 5), torch.randn(4, 2, 3)], y)
    sums_before, counts_before = _state(acc)
    means_before = [m.clone() for m in acc.means()]
    with pytest.raises(ValueError, match=r"features\[1\] has 7 values per row"):
        acc.update([torch.randn(4, 5), torch.randn(4, 7)], y)  # layer 0 fine, layer 1 too wide
    sums_after, counts_after = _state(acc)
    for a, b in zip(sums_before, sums_after):
        assert torch.equal(a, b)
    assert torch.equal(counts_before, counts_after)
    for a, b in zip(means_before, acc.means()):
        assert torch.equal(a, b)
    # and it still accepts a good batch afterwards
    acc.update([torch.ones(1, 5), torch.ones(1, 2, 3)], torch.tensor([0]))
    assert acc.counts.tolist() == [2.0, 2.0, 1.0]
