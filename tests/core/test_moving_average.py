"""The shared averaged-copy helpers (BLIP's momentum encoders, GLIDE's moving average of weights)."""
import copy

import pytest
import torch
from torch import nn

from vlmkit.layers.moving_average import copy_weights, paired_parameters, update_moving_average


def test_pairs_by_name_update_and_copy_follow_their_formulas():
    torch.manual_seed(0)
    trained = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    averaged = copy.deepcopy(trained)
    for param in averaged.parameters():
        param.data.normal_()
    online, copies = paired_parameters([(trained, averaged)])
    assert [p.shape for p in online] == [p.shape for p in copies] and len(online) == 4
    before = [c.clone() for c in copies]
    update_moving_average(copies, online, 0.9)
    for b, c, t in zip(before, copies, online):
        torch.testing.assert_close(c, 0.9 * b + 0.1 * t, rtol=0, atol=1e-7)
    copy_weights(copies, online)
    assert all(torch.equal(c, t) for c, t in zip(copies, online))


def test_a_copy_may_hold_fewer_parameters_but_not_unknown_ones():
    full = nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)})
    part = nn.ModuleDict({"a": nn.Linear(2, 2)})
    online, copies = paired_parameters([(full, part)])
    assert len(online) == 2 and online[0] is full["a"].weight
    with pytest.raises(KeyError):
        paired_parameters([(part, full)])
