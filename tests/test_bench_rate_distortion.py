"""bench/bench_rate_distortion.py: the noise band of a point's mean against the lossless point's."""
import math

import pytest

from bench.bench_rate_distortion import difference_of_means


def test_difference_of_means_and_its_standard_error_by_hand():
    # means 2 and 3; sample variances 1 and 2; s.e. = sqrt(1/3 + 2/2)
    delta, error = difference_of_means([1.0, 2.0, 3.0], [2.0, 4.0])
    assert delta == pytest.approx(-1.0) and error == pytest.approx(math.sqrt(4 / 3))
    # more seeds of the same spread narrow the band of the mean: sqrt(1/6 + 1/6) for six runs each
    six = [1.0, 2.0, 3.0, 1.0, 2.0, 3.0]
    assert difference_of_means(six, [x + 0.5 for x in six])[1] == pytest.approx(math.sqrt(0.8 / 6 * 2))


def test_a_single_run_has_no_standard_error():
    assert difference_of_means([5.0], [4.0, 6.0]) == (pytest.approx(0.0), None)
    assert difference_of_means([4.0, 6.0], [5.0])[1] is None
