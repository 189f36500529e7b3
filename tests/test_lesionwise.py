"""BraTS 2023+ lesion-wise scores (`fedmodal.metrics.lesionwise`): the rules on hand-made masks,
then the committed reference values of the challenge's own code (tests/fixtures/lesionwise)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fedmodal.metrics import segmentation_scores, tumour_rules
from fedmodal.metrics.lesionwise import LESION_HD95_PENALTY, LesionRules, lesion_scores

GLI = tumour_rules("GLI")


def cube(shape, corner, size) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[tuple(slice(c, c + size) for c in corner)] = True
    return mask


SHAPE = (48, 48, 40)


def test_a_perfect_prediction_scores_one_and_zero():
    truth = cube(SHAPE, (5, 5, 5), 6) | cube(SHAPE, (30, 30, 25), 5)
    assert lesion_scores(truth, truth) == {
        "lesion_dice": 1.0,
        "lesion_hd95": 0.0,
        "lesion_tp": 2,
        "lesion_fn": 0,
        "lesion_fp": 0,
    }


def test_a_missed_lesion_and_a_spurious_one_each_cost_dice_0_and_374_mm():
    found, missed = cube(SHAPE, (5, 5, 5), 6), cube(SHAPE, (30, 30, 25), 5)
    scores = lesion_scores(found, found | missed)
    assert (scores["lesion_tp"], scores["lesion_fn"], scores["lesion_fp"]) == (1, 1, 0)
    assert scores["lesion_dice"] == pytest.approx(0.5)
    assert scores["lesion_hd95"] == pytest.approx(LESION_HD95_PENALTY / 2)
    spurious = lesion_scores(found | missed, found)
    assert (spurious["lesion_tp"], spurious["lesion_fn"], spurious["lesion_fp"]) == (1, 0, 1)
    assert spurious["lesion_dice"] == pytest.approx(0.5)
    # The whole-volume Dice barely notices the spurious lesion that halves the lesion-wise one.
    assert segmentation_scores(found | missed, found, regions=("WT",))["WT"]["dice"] > 0.75


def test_truth_lesions_closer_than_the_dilation_are_one_lesion_and_small_ones_are_not_scored():
    left, right = cube(SHAPE, (10, 10, 10), 6), cube(SHAPE, (10, 10, 20), 6)  # 4 voxels apart
    joined = lesion_scores(left, left | right, rules=LesionRules(dilation=3, min_volume=50))
    assert joined["lesion_tp"] == 1 and joined["lesion_fn"] == 0  # one lesion, half found
    apart = lesion_scores(left, left | right, rules=LesionRules(dilation=1, min_volume=50))
    assert (apart["lesion_tp"], apart["lesion_fn"]) == (1, 1)

    big, tiny = cube(SHAPE, (5, 5, 5), 6), cube(SHAPE, (35, 35, 30), 3)  # 27 voxels: under 50 mm^3
    assert lesion_scores(big, big | tiny)["lesion_dice"] == 1.0  # the missed tiny one does not count
    # ...and a prediction of the tiny lesion is not spurious either, but anisotropic voxels count in mm^3.
    assert lesion_scores(big | tiny, big | tiny)["lesion_fp"] == 0
    coarse = lesion_scores(big, big | tiny, spacing=(2.0, 2.0, 2.0))  # 27 voxels = 216 mm^3: scored
    assert coarse["lesion_fn"] == 1


def test_empty_truth_and_prediction_score_as_the_challenge_does():
    empty = np.zeros(SHAPE, bool)
    lesion = cube(SHAPE, (5, 5, 5), 6)
    assert lesion_scores(empty, empty)["lesion_dice"] == 1.0
    assert lesion_scores(lesion, empty)["lesion_hd95"] == LESION_HD95_PENALTY
    assert lesion_scores(empty, lesion)["lesion_dice"] == 0.0


def test_a_2d_map_is_refused_whatever_it_holds():
    flat = np.zeros((32, 32), bool)
    flat[4:9, 4:9] = True
    for pred in (np.zeros_like(flat), flat):
        with pytest.raises(ValueError, match="3D label maps, got 2D"):
            lesion_scores(pred, flat)


def test_an_unknown_tumour_type_is_refused_by_name():
    with pytest.raises(ValueError, match=r"unknown tumour type 'xyz'.*GLI"):
        tumour_rules("xyz")
    assert tumour_rules("met").min_volume == 2.0


FIXTURES = Path(__file__).resolve().parent / "fixtures" / "lesionwise"


def reference_cases():
    return json.loads((FIXTURES / "reference_2023.json").read_text())["cases"]


@pytest.mark.parametrize("case", sorted(reference_cases()))
def test_the_challenges_own_2023_code_gives_the_same_scores(case):
    """Within 1e-3 Dice and 0.5 mm HD95 of the BraTS 2023 code (run apart, see the fixtures' README)."""
    expected = reference_cases()[case]
    truth_image, pred_image = nib.load(FIXTURES / expected["gt_file"]), nib.load(FIXTURES / expected["pred_file"])
    truth, pred = np.asarray(truth_image.dataobj).astype(int), np.asarray(pred_image.dataobj).astype(int)
    spacing = truth_image.header.get_zooms()[:3]
    scores = segmentation_scores(pred, truth, spacing, lesion_wise=GLI)
    for region in ("WT", "TC", "ET"):
        want, got = expected[region.lower()], scores[region]
        assert got["lesion_dice"] == pytest.approx(want["lesionwise_dice"], abs=1e-3), region
        assert got["lesion_hd95"] == pytest.approx(want["lesionwise_hd95"], abs=0.5), region
        assert (got["lesion_tp"], got["lesion_fn"], got["lesion_fp"]) == (want["tp"], want["fn"], want["fp"]), region
        assert got["dice"] == pytest.approx(want["legacy_dice"], abs=1e-6), region
