"""blues.train.debug: the test-only fault injection is parsed once, and a bad value names its variable."""
import pytest

from blues.train.debug import DebugConfig


def test_defaults_inject_nothing():
    d = DebugConfig.from_env({})
    assert d == DebugConfig() and not d.nan_at(1, 0) and d.kill_in_save_step is None and d.step_sleep == 0.0


def test_formats():
    d = DebugConfig.from_env({"BLUES_FAULT_NAN_STEPS": "3, 4,7.1", "BLUES_FAULT_KILL_IN_SAVE": "10",
                              "BLUES_TEST_STEP_SLEEP": "0.3"})
    assert d.nan_at(3, 0) and d.nan_at(3, 5) and d.nan_at(4, 1)  # a bare step: every micro-batch
    assert d.nan_at(7, 1) and not d.nan_at(7, 0)  # "7.1": only micro-batch 1 of step 7
    assert not d.nan_at(5, 0)
    assert d.kill_in_save_step == 10 and d.step_sleep == 0.3


@pytest.mark.parametrize("name,value", [
    ("BLUES_FAULT_NAN_STEPS", "3,x"),
    ("BLUES_FAULT_NAN_STEPS", "0"),  # steps are 1-based: 0 would never fire
    ("BLUES_FAULT_NAN_STEPS", "7."),
    ("BLUES_FAULT_KILL_IN_SAVE", "ten"),
    ("BLUES_TEST_STEP_SLEEP", "-1"),
    ("BLUES_TEST_STEP_SLEEP", "nan"),
])
def test_bad_value_names_the_variable(name, value):
    with pytest.raises(ValueError, match=f"{name}={value!r} is invalid"):
        DebugConfig.from_env({name: value})


def test_blues_train_refuses_a_bad_value_before_starting(capsys, tmp_path, monkeypatch):
    from blues.cli.train import main
    monkeypatch.setenv("BLUES_TEST_STEP_SLEEP", "soon")
    assert main([f"out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "blues-train: error: BLUES_TEST_STEP_SLEEP='soon' is invalid" in err and "Traceback" not in err


def test_the_loop_reads_no_environment():
    """Parsed once at start (DebugConfig on Run), never inside the loop."""
    import inspect

    from blues.train import loop, step
    for module in (loop, step):
        assert "os.environ" not in inspect.getsource(module) and "getenv" not in inspect.getsource(module)
