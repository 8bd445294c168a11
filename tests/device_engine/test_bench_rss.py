"""`nanofleet bench` reports the peak RSS of its own process, not of whoever started it."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from tests.conftest import REPO


def test_peak_rss_is_this_process_not_a_big_parent() -> None:
    # Linux carries ru_maxrss across fork+exec: a child of an 800 MB parent would report >= 800 MB.
    ballast = np.ones(800 * 2**20 // 8)  # touched: 800 MB resident in this (parent) process
    code = "from device.engine.bench import _peak_rss_mb; print(_peak_rss_mb())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    del ballast
    assert 5 < float(out.stdout) < 400, out.stdout
