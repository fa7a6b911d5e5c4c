import numpy as np
import pytest
import torch

from ufm.measure.candidates import (DEFAULT_FAMILY, FAMILIES, VALID_FAMILIES, CandidateSet, CandidatesUnavailable,
                            candidate_set, default_family, derived_generator, distinct_candidates, is_solid,
                            resolve_family)
from ufm.core.canary import CANDIDATE_KINDS, stamp
from ufm.core.features import Feature, FeatureError, glyph, grid_feature, image_feature, text_feature


def _keys(patches):
    return [p.numpy().tobytes() for p in patches]


def _gen(seed=0):
    return derived_generator(seed, "candidates")


def test_derived_generators_are_stable_and_separate():
    a = torch.rand(5, generator=derived_generator(3, "z_r"))
    assert torch.equal(a, torch.rand(5, generator=derived_generator(3, "z_r")))
    assert not torch.equal(a, torch.rand(5, generator=derived_generator(3, "candidates")))
    assert not torch.equal(a, torch.rand(5, generator=derived_generator(4, "z_r")))


def test_default_family_by_kind():
    assert DEFAULT_FAMILY == {"text": "strings", "glyph": "shift", "drawn": "strokes", "image": "permute"}
    assert default_family(text_feature("AB")) == "strings"
    assert default_family(glyph("A")) == "shift"
    assert default_family(grid_feature([[1, 0], [0, 1]])) == "strokes"
    assert default_family(grid_feature([[0.5, 0], [0, 1]])) == "permute"  # strokes needs a binary pattern
    assert default_family(image_feature(np.eye(4), 4)) == "permute"
    assert resolve_family(glyph("A"), "auto") == "shift" and resolve_family(glyph("A"), None) == "shift"
    assert set(CANDIDATE_KINDS) == set(FAMILIES) | {"auto"}
    with pytest.raises(FeatureError, match="choose one of permute, strokes, shift, bernoulli, uniform"):
        resolve_family(glyph("A"), "strings")
    with pytest.raises(FeatureError, match="choose one of"):
        resolve_family(glyph("A"), "nope")
    for kind, fams in VALID_FAMILIES.items():
        assert set(fams) <= set(FAMILIES) and "permute" in fams


def test_distinct_counts_known_answers():
    shape = (1, 10, 10)
    small = grid_feature([[1, 0, 1], [0, 1, 0], [1, 0, 1]])  # 5 ones of 9: C(9, 5) = 126 arrangements
    assert distinct_candidates(small, "permute", shape) == 125
    assert distinct_candidates(small, "strokes", shape) == 125
    assert distinct_candidates(small, "shift", shape) == 8 * 8 - 1
    assert distinct_candidates(small, "bernoulli", shape) == 2 ** 9 - 1
    grey = grid_feature([[0.5, 0.5], [1.0, 0.0]])  # 4! / 2! = 12 arrangements
    assert distinct_candidates(grey, "permute", shape) == 11
    assert distinct_candidates(grey, "bernoulli", shape) == 16  # z_u is not binary: not in the family
    colour = Feature(pattern=np.stack([np.array([[1, 1], [0, 0]]), np.array([[1, 1], [0, 1]]),
                                       np.zeros((2, 2))]).tolist())
    # pixel colours (1,1,0), (1,1,0), (0,0,0), (0,1,0): 4! / 2! = 12 arrangements of colour tuples
    assert distinct_candidates(colour, "permute", (3, 10, 10)) == 11
    assert distinct_candidates(text_feature("Ab 1"), "strings", (1, 20, 60)) == 26 * 26 * 10 - 1
    solid = grid_feature([[1, 1], [1, 1]])
    assert is_solid(solid) and not is_solid(small)
    assert all(distinct_candidates(solid, f, shape) == 0 for f in ("permute", "strokes", "shift", "bernoulli"))


def test_solid_and_too_small_families_are_unavailable_with_advice():
    with pytest.raises(CandidatesUnavailable, match="solid"):
        candidate_set(grid_feature([[1]]), 5, "permute", (1, 8, 8), _gen())
    with pytest.raises(CandidatesUnavailable, match="solid"):
        candidate_set(grid_feature([[0.3, 0.3], [0.3, 0.3]]), 5, "shift", (1, 8, 8), _gen())
    small = grid_feature([[1, 0, 1], [0, 1, 0], [1, 0, 1]])
    with pytest.raises(CandidatesUnavailable, match=r"only 125 distinct.*K = 126.*at most 125"):
        candidate_set(small, 126, "permute", (1, 8, 8), _gen())
    assert issubclass(CandidatesUnavailable, FeatureError)


@pytest.mark.parametrize("family", ["permute", "strokes", "bernoulli", "uniform"])
def test_candidates_are_distinct_and_never_the_feature(family):
    small = grid_feature([[1, 0, 1], [0, 1, 0], [1, 0, 1]], offset=(2, 3))
    cs = candidate_set(small, 125 if family in ("permute", "strokes") else 99, family, (1, 8, 8), _gen())
    keys = _keys(cs.patches)
    assert len(set(keys)) == len(keys) == len(cs)
    assert small.array().tobytes() not in keys
    assert cs.offsets == [small.offset] * len(cs) and cs.family == family
    assert cs.patches.dtype == torch.float32 and cs.patches.shape[1:] == (3, 3)
    again = candidate_set(small, len(cs), family, (1, 8, 8), _gen())
    assert torch.equal(again.patches, cs.patches)  # deterministic per seed


def test_permute_keeps_the_multiset_and_intensity():
    f = glyph("A", intensity=0.5)
    cs = candidate_set(f, 50, "permute", (1, 28, 28), _gen())
    assert torch.all(cs.patches.sum((1, 2)) == float(f.array().sum()))
    assert set(torch.unique(cs.patches).tolist()) == {0.0, 0.5}


def test_strokes_keep_the_ink_count():
    for f in (glyph("A"), glyph("X", size=7), text_feature("HI", height=6)):
        ink = int(np.asarray(f.pattern).sum())
        cs = candidate_set(f, 40, "strokes", (1, 40, 40), _gen(1))
        assert torch.all(cs.patches.sum((1, 2)) == ink)
        assert set(torch.unique(cs.patches).tolist()) == {0.0, 1.0}
        assert len(set(_keys(cs.patches))) == 40 and f.array().tobytes() not in _keys(cs.patches)
    half = glyph("A", intensity=0.25)
    assert set(torch.unique(candidate_set(half, 5, "strokes", (1, 8, 8), _gen()).patches).tolist()) == {0, 0.25}


def test_strokes_are_made_of_lines():
    """A stroke pattern has far fewer isolated ink pixels than a random rearrangement of the same ink."""
    f = glyph("A", size=9)

    def isolated(p):
        a = np.pad(p.numpy() > 0, 1)
        neigh = sum(np.roll(np.roll(a, dr, 0), dc, 1) for dr in (-1, 0, 1) for dc in (-1, 0, 1)) - a
        return int(np.sum(a & (neigh == 0)))

    strokes = candidate_set(f, 60, "strokes", (1, 12, 12), _gen())
    perms = candidate_set(f, 60, "permute", (1, 12, 12), _gen())
    assert np.mean([isolated(p) for p in strokes.patches]) < 0.5 * np.mean([isolated(p) for p in perms.patches])


def test_strings_family():
    f = text_feature("Jo 42", height=7, offset=(2, 1))
    cs = candidate_set(f, 30, "strings", (1, 12, 30), _gen(5))
    assert cs.patches.shape == (30, *f.size) and cs.offsets == [(2, 1)] * 30
    keys = _keys(cs.patches)
    assert len(set(keys)) == 30 and f.array().tobytes() not in keys
    assert set(torch.unique(cs.patches).tolist()) <= {0.0, 1.0}  # same threshold as the feature
    assert torch.equal(cs.patches, candidate_set(f, 30, "strings", (1, 12, 30), _gen(5)).patches)
    assert not torch.equal(cs.patches, candidate_set(f, 30, "strings", (1, 12, 30), _gen(6)).patches)
    # each candidate is a rendered string of the same classes: re-render one from the same renderer
    from ufm.core.features import render_text
    assert np.array_equal(render_text("Ab 13", 7, width=f.size[1]).shape, f.size)
    with pytest.raises(FeatureError, match="strings"):
        resolve_family(glyph("A"), "strings")


def test_strings_too_few_when_text_is_short():
    f = text_feature("7", height=5)  # 10 digits: 9 strings differ from "7"
    with pytest.raises(CandidatesUnavailable, match="only 9"):
        candidate_set(f, 10, "strings", (1, 10, 10), _gen())
    cs = candidate_set(f, 5, "strings", (1, 10, 10), _gen())
    assert len(set(_keys(cs.patches))) == 5


def test_shift_keeps_the_pattern_and_moves_it():
    f = glyph("A", offset=(1, 1))
    cs = candidate_set(f, 20, "shift", (1, 10, 12), _gen())
    assert isinstance(cs, CandidateSet) and cs.family == "shift"
    assert all(torch.equal(p, torch.from_numpy(f.array())) for p in cs.patches)
    assert len(set(cs.offsets)) == 20 and f.offset not in cs.offsets
    assert all(0 <= r <= 10 - 5 and 0 <= c <= 12 - 5 for r, c in cs.offsets)
    images = torch.zeros(1, 1, 10, 12)
    for p, o in zip(cs.patches, cs.offsets):  # every candidate fits the image
        assert stamp(images, p, o).sum() == f.array().sum()
    with pytest.raises(CandidatesUnavailable, match="only 2 distinct"):  # 1 x 3 offsets, one is z_u's
        candidate_set(glyph("A", offset=(0, 0)), 3, "shift", (1, 5, 7), _gen())


def test_candidate_set_checks_its_input():
    with pytest.raises(FeatureError, match="runs off"):
        candidate_set(glyph("A", offset=(5, 5)), 3, "permute", (1, 8, 8), _gen())
    with pytest.raises(ValueError, match="K must be"):
        candidate_set(glyph("A"), 0, "permute", (1, 8, 8), _gen())


def test_cli_candidate_kind_choices_are_the_families():
    from ufm.cli import build_parser

    parser = build_parser()
    measure = next(a for a in parser._subparsers._group_actions[0].choices.values()
                   if any("--candidate-kind" in x.option_strings for x in a._actions))
    action = next(x for x in measure._actions if "--candidate-kind" in x.option_strings)
    assert tuple(action.choices) == CANDIDATE_KINDS and action.default == "auto"
