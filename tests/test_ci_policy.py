"""Under CI (CI=true) a skip fails the run unless the test is marked gpu (tests/conftest.py)."""
import os
import shutil
import subprocess
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))

SAMPLE = '''
import pytest

def test_missing_cluster():
    pytest.skip("no cluster")

@pytest.mark.gpu
def test_needs_cuda():
    pytest.skip("needs CUDA")

def test_runs():
    pass
'''


def _run(tmp_path, ci: str):
    shutil.copy(os.path.join(TESTS, "conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs CUDA\n")
    env = dict(os.environ, CI=ci)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True)


def test_under_ci_a_skip_fails_except_gpu(tmp_path):
    out = _run(tmp_path, "true")
    assert out.returncode == 1, out.stdout
    assert "1 failed, 1 passed, 1 skipped" in out.stdout
    assert "test_missing_cluster - skipped under CI (Skipped: no cluster)" in out.stdout


def test_outside_ci_a_skip_is_a_skip(tmp_path):
    out = _run(tmp_path, "")
    assert out.returncode == 0, out.stdout
    assert "1 passed, 2 skipped" in out.stdout
