"""Continual-learning measures of the accuracy matrix, against hand computations."""

from __future__ import annotations

import math

import pytest

from forgetkit.results.sequence import (
    bwt,
    final_average,
    fwt,
    learning_accuracy,
    task_forgetting,
)

# 3 stages x 3 tasks, accuracies (higher is better): row i = after stage i
R = [[0.70, 0.30, 0.20],
     [0.55, 0.80, 0.25],
     [0.50, 0.60, 0.90]]
BASE = [0.25, 0.28, 0.22]
UP = [True, True, True]


def test_hand_computed_accuracy_matrix() -> None:
    assert final_average(R, UP) == pytest.approx((0.50 + 0.60 + 0.90) / 3)
    assert learning_accuracy(R, UP) == pytest.approx((0.70 + 0.80 + 0.90) / 3)
    # task 0: best of 0.70 (stage 0), 0.55 (stage 1) = 0.70; final 0.50 -> 0.20
    # task 1: best of 0.80 (stage 1) -> 0.80 - 0.60 = 0.20
    assert task_forgetting(R, UP) == pytest.approx([0.20, 0.20])
    # BWT: ((0.50 - 0.70) + (0.60 - 0.80)) / 2
    assert bwt(R, UP) == pytest.approx(-0.20)
    # FWT: ((R[0][1] - b1) + (R[1][2] - b2)) / 2 = ((0.30 - 0.28) + (0.25 - 0.22)) / 2
    assert fwt(R, UP, BASE) == pytest.approx(0.025)


def test_lower_is_better_signs_follow_the_direction() -> None:
    """The same story in NLL (lower is better): forgetting positive, BWT negative."""
    nll = [[1.0, 3.0, 3.2],
           [1.4, 1.2, 3.1],
           [1.6, 1.5, 0.9]]
    base = [2.0, 3.1, 3.3]
    down = [False, False, False]
    # task 0: best (lowest) 1.0 at stage 0; final 1.6 -> forgot 0.6; task 1: 1.2 -> 1.5: 0.3
    assert task_forgetting(nll, down) == pytest.approx([0.6, 0.3])
    assert bwt(nll, down) == pytest.approx(-(0.6 + 0.3) / 2)
    # FWT: -( (3.0 - 3.1) + (3.1 - 3.3) ) / 2 = +0.15 (the earlier stages lowered the NLL)
    assert fwt(nll, down, base) == pytest.approx(0.15)
    # mixed directions: each task its own sign
    mixed = [True, False, True]
    r = [[0.7, 3.0, 0.2], [0.6, 1.2, 0.3], [0.5, 1.5, 0.9]]
    assert bwt(r, mixed) == pytest.approx(((0.5 - 0.7) - (1.5 - 1.2)) / 2)


def test_forgetting_ignores_stages_before_the_task_was_trained() -> None:
    # task 1 scored 0.9 by chance before it was trained (stage 0): not its "best earlier value"
    r = [[0.7, 0.9, 0.1], [0.6, 0.5, 0.1], [0.6, 0.4, 0.8]]
    assert task_forgetting(r, UP)[1] == pytest.approx(0.1)


def test_shapes_and_degenerate_sequences() -> None:
    assert math.isnan(bwt([[0.5]], [True])) and math.isnan(fwt([[0.5]], [True], [0.4]))
    assert task_forgetting([[0.5]], [True]) == []
    with pytest.raises(ValueError, match="T x T"):
        bwt([[0.1, 0.2], [0.3]], UP[:2])
    with pytest.raises(ValueError, match="flags"):
        bwt(R, [True])
    with pytest.raises(ValueError, match="base scores"):
        fwt(R, UP, [0.1])
    with pytest.raises(ValueError, match="empty"):
        final_average([], [])
    # a NaN only where no measure reads it (R[0][1]) changes nothing: BWT = 0.4 - 0.5
    assert bwt([[0.5, math.nan], [0.4, 0.6]], [True, True]) == pytest.approx(-0.1)
    assert math.isnan(bwt([[math.nan, 0.1], [0.4, 0.6]], [True, True]))
