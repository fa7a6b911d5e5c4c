import numpy as np
import pytest
import torch

from ufm.core.canary import CanaryChoice, choose_canaries, permuted_patches, random_patches, stamp, stamp_feature
from ufm.core.features import glyph


def test_stamp_pixel_by_pixel_greyscale():
    x = torch.rand(3, 1, 10, 12)
    f = glyph("A", offset=(2, 3))
    out = stamp_feature(x, f)
    a = torch.from_numpy(f.array())
    for n in range(3):
        for r in range(10):
            for c in range(12):
                inside = 2 <= r < 7 and 3 <= c < 8
                want = a[r - 2, c - 3] if inside else x[n, 0, r, c]
                assert out[n, 0, r, c] == want
    assert not torch.equal(out, x) and x.shape == out.shape


def test_stamp_goes_on_every_channel_and_leaves_input_alone():
    x = torch.rand(2, 3, 8, 8)
    before = x.clone()
    out = stamp(x, torch.ones(2, 2), (0, 6))
    assert torch.equal(x, before)
    assert torch.all(out[:, :, 0:2, 6:8] == 1)
    assert torch.equal(out[:, :, 2:, :], x[:, :, 2:, :]) and torch.equal(out[:, :, :, :6], x[:, :, :, :6])


def test_stamp_colour_and_per_image_patches():
    x = torch.zeros(2, 3, 6, 6)
    colour = torch.arange(3.0).view(3, 1, 1).expand(3, 2, 2) / 2
    out = stamp(x, colour, (1, 1))
    for ch in range(3):
        assert torch.all(out[:, ch, 1:3, 1:3] == ch / 2)
    per = torch.stack([torch.full((1, 2, 2), 0.25), torch.full((1, 2, 2), 0.75)])
    out = stamp(x, per, (4, 4))
    assert torch.all(out[0, :, 4:, 4:] == 0.25) and torch.all(out[1, :, 4:, 4:] == 0.75)


def test_stamp_rejects_out_of_bounds():
    with pytest.raises(ValueError, match="does not fit"):
        stamp(torch.zeros(1, 1, 5, 5), torch.ones(3, 3), (3, 0))


def test_random_patches_seeded_fresh_and_bernoulli():
    a = random_patches(500, (5, 5), generator=torch.Generator().manual_seed(1))
    b = random_patches(500, (5, 5), generator=torch.Generator().manual_seed(1))
    c = random_patches(500, (5, 5), generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert set(a.unique().tolist()) == {0.0, 1.0}
    assert abs(a.mean().item() - 0.5) < 0.02
    flat = a.view(500, -1)
    assert len({tuple(r.tolist()) for r in flat}) > 490  # a fresh pattern per image
    u = random_patches(100, (5, 5), kind="uniform", intensity=0.5, generator=torch.Generator().manual_seed(0))
    assert 0 <= u.min() and u.max() <= 0.5 and len(u.unique()) > 100
    with pytest.raises(ValueError, match="bernoulli, uniform"):
        random_patches(1, (2, 2), kind="gauss")


def test_permuted_patches_keep_ink():
    f = glyph("A")
    p = permuted_patches(f.array(), 50, generator=torch.Generator().manual_seed(0))
    assert p.shape == (50, 5, 5)
    assert torch.all(p.sum((1, 2)) == f.array().sum())
    assert len({tuple(q.flatten().tolist()) for q in p}) > 45
    colour = torch.rand(3, 4, 4)
    pc = permuted_patches(colour, 5, generator=torch.Generator().manual_seed(0))
    # each permuted pixel keeps its colour: the multiset of (r, g, b) triples is unchanged
    orig = sorted(map(tuple, colour.reshape(3, -1).T.tolist()))
    assert all(sorted(map(tuple, q.reshape(3, -1).T.tolist())) == orig for q in pc)


def test_choose_canaries_modes():
    y = np.array([0, 1, 2] * 20)
    assert choose_canaries(CanaryChoice("none", ()), y).size == 0
    np.testing.assert_array_equal(choose_canaries(CanaryChoice("index", (5, 2, 5)), y), [2, 5])
    r = choose_canaries(CanaryChoice("random", (), count=10), y, seed=3)
    assert len(r) == 10 and len(set(r)) == 10
    np.testing.assert_array_equal(r, choose_canaries(CanaryChoice("random", (), count=10), y, seed=3))
    c = choose_canaries(CanaryChoice("class", (), count=15, label=1), y, seed=0)
    assert np.all(y[c] == 1) and len(c) == 15
    with pytest.raises(ValueError, match="outside the training set"):
        choose_canaries(CanaryChoice("index", (60,)), y)
    with pytest.raises(ValueError, match="only 20"):
        choose_canaries(CanaryChoice("class", (), count=21, label=1), y)
    with pytest.raises(ValueError, match="needs a label"):
        CanaryChoice("class", (), count=2)


def test_canary_choice_round_trip():
    c = CanaryChoice("class", (), count=4, label=2)
    assert CanaryChoice.from_dict(c.to_dict()) == c
