"""The shared copy-bandwidth measurement returns a finite, positive rate on any device."""

import math

from kernels.bench.bandwidth import copy_bandwidth


def test_copy_bandwidth_on_cpu_is_a_positive_finite_rate():
    rate = copy_bandwidth("cpu", 2**20)
    assert 0 < rate < math.inf
