"""benchmarks/common.py: what every benchmark's results say about the machine they were measured on."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from benchmarks.common import machine
from learner.policy import cpu_has_fast_bf16


def test_results_say_which_machine_they_came_from() -> None:
    m = machine()
    assert m["cpu_count"] == os.cpu_count() and m["torch"] == torch.__version__
    # whether the learner's 'auto' precision trains in bf16 here: a ~1.6x difference per update
    assert m["cpu_fast_bf16"] is cpu_has_fast_bf16()
    if Path("/proc/cpuinfo").exists():
        assert m["cpu_model"] != "unknown" and m["cpu_model"].strip() == m["cpu_model"] != ""
