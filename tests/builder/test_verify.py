"""builder.verify.compare: the agreement of a variant with fp32, per kind of output."""

from __future__ import annotations

import numpy as np

from builder.verify import Outputs, compare


def _one_hot(indices: np.ndarray, classes: int) -> np.ndarray:
    return np.eye(classes)[indices]


def test_a_sequence_output_agrees_only_where_every_position_reads_the_same():
    # [N, T, C]: 3 lines of 5 positions over 4 symbols; line 1 differs at one position, line 2 everywhere
    reference = np.array([[0, 1, 1, 2, 0], [3, 3, 0, 1, 0], [2, 0, 0, 0, 1]])
    candidate = reference.copy()
    candidate[1, 2] = 2
    candidate[2] = [1, 1, 1, 1, 0]
    result = compare(Outputs({"y": _one_hot(candidate, 4)}), Outputs({"y": _one_hot(reference, 4)}), None, "agreement")
    assert result["agreement"] == result["accuracy"] == 1 / 3
    # as the builder stacks them: each sample's output keeps its batch axis of 1, [N, 1, T, C]
    stacked = compare(Outputs({"y": _one_hot(candidate, 4)[:, None]}), Outputs({"y": _one_hot(reference, 4)[:, None]}),
                      None, "agreement")
    assert stacked["agreement"] == 1 / 3


def test_a_classifier_s_agreement_is_the_share_of_equal_top1():
    reference = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    candidate = np.array([[0.2, 0.8], [0.4, 0.6], [0.3, 0.7], [0.9, 0.1]])
    result = compare(Outputs({"y": candidate}), Outputs({"y": reference}), np.array([1, 0, 1, 0]), "top1")
    assert result["agreement"] == 0.75 and result["accuracy"] == 0.75
    stacked = compare(Outputs({"y": candidate[:, None]}), Outputs({"y": reference[:, None]}), None, "agreement")
    assert stacked["agreement"] == 0.75  # [N, 1, C]: one position
