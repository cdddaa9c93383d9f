"""The suite's own footprint: CI runs it on a shared disk, so a passing test must not leave its
files behind (the ViT checkpoints of the paper's commands alone are hundreds of MB each)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = '''
def test_passes(tmp_path):
    (tmp_path / "big.bin").write_bytes(b"0" * 1000)

def test_fails(tmp_path):
    (tmp_path / "big.bin").write_bytes(b"0" * 1000)
    assert False
'''


def test_a_passing_tests_folder_is_removed_and_a_failing_ones_kept(tmp_path):
    """Run two probe tests under the project's pytest settings (pyproject.toml): the passing one's
    tmp_path is gone when the session ends, the failing one's is kept for a look."""
    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "test_probe.py").write_text(PROBE)
    base = tmp_path / "base"
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", str(ROOT / "pyproject.toml"),
                        "--rootdir", str(tmp_path / "probe"), "--basetemp", str(base), str(tmp_path / "probe")],
                       capture_output=True, text=True, timeout=120)
    assert "1 failed, 1 passed" in p.stdout, p.stdout + p.stderr
    left = sorted(f.parent.name for f in base.rglob("big.bin"))
    assert left == ["test_fails0"], left


def test_a_short_temp_folder_is_named_before_the_tests_start():
    from conftest import SUITE_PEAK_BYTES, low_disk_warning

    assert low_disk_warning("/tmp", 40 * 2**30) is None
    assert low_disk_warning("/tmp", 2 * SUITE_PEAK_BYTES) is None
    line = low_disk_warning("/tmp", 287 * 2**20)
    assert line == ("warning: only 287 MB free in /tmp; the test suite writes about 500 MB of temporary files at "
                    "its peak (TMPDIR=... or --basetemp moves them)")
