"""cfseg.metrics: backward transfer and the average after the last stage on matrices of more than two stages.

On a two-stage matrix the diagonal term R[j][j] and the previous row R[T-1][j] are the same entry, so a BWT that
subtracts the wrong row (or divides by the wrong count) still gives the right answer there; these matrices tell
them apart. Expected values are worked out by hand in the comments.
"""

from __future__ import annotations

import math

import pytest

from cfseg.metrics import average_after_last, backward_transfer

NAN = float("nan")

# 3 stages: R[i][j] = Dice on stage j's test cases after stage i (lower-triangular, as the protocol writes it)
R3 = [[0.8],
      [0.6, 0.9],
      [0.5, 0.7, 0.6]]
# BWT = ((R[2][0] - R[0][0]) + (R[2][1] - R[1][1])) / 2 = ((0.5 - 0.8) + (0.7 - 0.9)) / 2 = (-0.3 - 0.2) / 2 = -0.25
#   (last row minus the previous row instead: ((0.5 - 0.6) + (0.7 - 0.9)) / 2 = -0.15;
#    dividing by 3 stages instead of 2: -0.5 / 3 = -0.1667)
# average after the last stage = (0.5 + 0.7 + 0.6) / 3 = 1.8 / 3 = 0.6   (the diagonal's mean would be 0.7667)

# 4 stages, forgetting of different sizes per stage
R4 = [[0.9],
      [0.7, 0.8],
      [0.6, 0.5, 0.7],
      [0.4, 0.6, 0.3, 0.5]]
# BWT = ((0.4 - 0.9) + (0.6 - 0.8) + (0.3 - 0.7)) / 3 = (-0.5 - 0.2 - 0.4) / 3 = -1.1 / 3 = -0.36667
#   (last row minus the previous row: ((0.4 - 0.6) + (0.6 - 0.5) + (0.3 - 0.7)) / 3 = -0.5 / 3 = -0.16667;
#    last row minus the first row's entries where they exist would need R[0][1]: an IndexError)
# average after the last stage = (0.4 + 0.6 + 0.3 + 0.5) / 4 = 1.8 / 4 = 0.45

# 3 stages with positive backward transfer on one stage: a later stage improved an earlier one
R3_POSITIVE = [[0.5],
               [0.6, 0.7],
               [0.7, 0.6, 0.8]]
# BWT = ((0.7 - 0.5) + (0.6 - 0.7)) / 2 = (0.2 - 0.1) / 2 = 0.05
# average = (0.7 + 0.6 + 0.8) / 3 = 2.1 / 3 = 0.7


@pytest.mark.parametrize(("R", "bwt", "average"), [
    (R3, -0.25, 0.6),
    (R4, -1.1 / 3, 0.45),
    (R3_POSITIVE, 0.05, 0.7),
])
def test_backward_transfer_and_average_on_three_and_four_stages(R, bwt, average):
    assert backward_transfer(R) == pytest.approx(bwt, abs=1e-12)
    assert average_after_last(R) == pytest.approx(average, abs=1e-12)


def test_backward_transfer_ignores_the_forward_entries_of_a_full_matrix():
    """full_matrix: every row scores every stage; the entries above the diagonal (forward transfer, NaN where the
    model does not know a later stage's classes yet) are not part of BWT (protocol docstring)."""
    full = [[0.8, NAN, 0.1],
            [0.6, 0.9, NAN],
            [0.5, 0.7, 0.6]]
    # the same lower triangle as R3: BWT -0.25, average of the (complete) last row 0.6
    assert backward_transfer(full) == pytest.approx(-0.25, abs=1e-12)
    assert average_after_last(full) == pytest.approx(0.6, abs=1e-12)


def test_backward_transfer_is_nan_without_a_later_stage():
    """Documented: BWT needs a stage after the first (T >= 1); one stage has nothing to forget."""
    assert math.isnan(backward_transfer([[0.7]]))
    assert math.isnan(backward_transfer([]))
    assert average_after_last([[0.7]]) == pytest.approx(0.7)
