"""The prepared GPU check runs before a GPU minute is spent on it: benchmarks/gpu_check.py --smoke, as CI
runs it, on the CPU in Triton's interpreter; and benchmarks/moe_layer.py fails on a wrong output.

The smoke run imitates the GPU machine, where Blues is not pip-installed: `python -S` skips site, so the
editable install's path hook never runs, and this interpreter's site-packages come in through PYTHONPATH
as plain folders (torch, triton; deepspeed is there too, and the check must not import it)."""
import importlib.util
import json
import os
import site
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GPU_CHECK = os.path.join(ROOT, "benchmarks", "gpu_check.py")
MOE_LAYER = os.path.join(ROOT, "benchmarks", "moe_layer.py")
CORRECTNESS_STEPS = {"b_layer_ops", "c_permutation", "f_determinism", "g_backends", "h_model", "imports",
                     "i_timing", "j_loss"}  # i_timing: the outputs are checked before they are timed


def _env_without_blues_installed() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "TRITON"))}
    env.update(PYTHONPATH=os.pathsep.join(site.getsitepackages()), OMP_NUM_THREADS="1")
    return env


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    proc = subprocess.run([sys.executable, "-S", GPU_CHECK, "--smoke", "--out", str(out)], cwd=out,
                          env=_env_without_blues_installed(), capture_output=True, text=True, timeout=600)
    path = out / "gpu_check.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return proc, rows


def _explain(proc) -> str:
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"


@pytest.mark.slow
def test_smoke_exits_0_and_every_correctness_row_passes(smoke):
    proc, rows = smoke
    assert proc.returncode == 0, _explain(proc)
    assert [r for r in rows if r["status"] in ("fail", "error")] == [], _explain(proc)
    correctness = [r for r in rows if r["kind"] == "correctness"]
    assert {r["status"] for r in correctness} <= {"pass", "skipped"}
    assert {r["step"] for r in correctness if r["status"] == "pass"} == CORRECTNESS_STEPS
    layer = [r["name"] for r in rows if r["step"] == "b_layer_ops"]
    assert {n.rsplit("-", 1)[1] for n in layer} == {"fp32", "fp16", "bf16"}, layer
    dropped = [r["dropped"] for r in rows if r["step"] == "c_permutation"]
    assert len(dropped) >= 4 and min(dropped) > 0, "the permutation step must exercise capacity drops"


@pytest.mark.slow
def test_smoke_records_the_cuda_only_checks_as_skipped_with_the_reason(smoke):
    _, rows = smoke
    skipped = {(r["step"], r["name"]): r["reason"] for r in rows if r["status"] == "skipped"}
    for key in [("d_no_host_sync", "layer"), ("d_no_host_sync", "layer-capacity"), ("d_no_host_sync", "model"),
                ("e_int64_index", "permute-swiglu"), ("g_backends", "sdpa_gqa_kernels"),
                ("i_timing", "tiny-blues_triton")]:
        assert skipped.get(key, "").startswith("needs CUDA"), (key, skipped)
    assert all(reason.startswith("needs CUDA") for reason in skipped.values()), skipped


@pytest.mark.slow
def test_smoke_never_imports_deepspeed(smoke):
    _, rows = smoke
    (row,) = [r for r in rows if r["step"] == "imports"]
    assert row["status"] == "pass" and row["deepspeed_modules"] == [], row


@pytest.mark.slow
def test_smoke_times_the_cpu_implementations_and_profiles_them(smoke):
    _, rows = smoke
    timed = {r["name"]: r for r in rows if r["step"] == "i_timing" and "fwd_bwd_ms" in r}
    assert set(timed) == {"tiny-blues_torch", "tiny-grouped_mm", "tiny-floor"}, sorted(timed)
    assert all(r["fwd_bwd_ms"] > 0 for r in timed.values())
    checked = {r["name"] for r in rows if r["step"] == "i_timing" and r["name"].endswith("-output")}
    # blues_triton's output is checked (in the interpreter) though it is not timed on a CPU
    assert checked == {"tiny-blues_triton-output", "tiny-blues_torch-output", "tiny-grouped_mm-output"}
    profiles = [r for r in rows if r["name"].endswith("-profile")]
    assert profiles and all(r["top_kernels"] for r in profiles)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the wrapper would run the whole GPU check")
def test_the_wrapper_without_cuda_says_so_in_one_line_and_exits_2(tmp_path):
    proc = subprocess.run(["bash", os.path.join(ROOT, "launch", "gpu_check.sh"), str(tmp_path / "out")],
                          env=_env_without_blues_installed(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, _explain(proc)
    assert "gpu_check: error: no CUDA device here" in proc.stdout and "Traceback" not in proc.stdout
    assert (tmp_path / "out" / "gpu_check.log").exists()


@pytest.mark.parametrize("inject", [None, "grouped_mm"], ids=["all right: exit 0", "grouped_mm wrong: exit 1"])
def test_moe_layer_fails_on_a_wrong_output(tmp_path, inject):
    rows_path = tmp_path / "rows.jsonl"
    cmd = [sys.executable, MOE_LAYER, "--device", "cpu", "--shapes", "tiny", "--routing", "balanced", "--impls",
           "blues_torch", "grouped_mm", "floor", "--reps", "1", "--warmup", "0", "--no_memory", "--out", str(rows_path)]
    proc = subprocess.run(cmd + (["--inject_wrong", inject] if inject else []), cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    rows = {r["impl"]: r for r in map(json.loads, rows_path.read_text().splitlines())}
    assert rows["blues_torch"]["output_ok"] is True
    assert rows["floor"]["output_ok"] is None  # no output to check
    if inject is None:
        assert proc.returncode == 0, _explain(proc)
        assert rows["grouped_mm"]["output_ok"] is True
    else:
        assert proc.returncode == 1, _explain(proc)
        assert rows["grouped_mm"]["output_ok"] is False
        assert "FAILED: wrong output from grouped_mm at tiny balanced" in proc.stderr


def test_timing_shapes_are_skipped_and_recorded_when_the_budget_is_spent(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check_under_test", GPU_CHECK)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    check = gpu_check.Check(str(tmp_path), budget_s=0, smoke=True)
    gpu_check.step_timing(check)
    rows = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    assert [(r["name"], r["status"]) for r in rows] == [("tiny", "skipped")]
    assert rows[0]["reason"].startswith("budget:") and check.failed == []


def test_steps_runs_only_the_named_steps_and_refuses_an_unknown_one(tmp_path):
    cmd = [sys.executable, "-S", GPU_CHECK, "--smoke", "--out", str(tmp_path)]
    proc = subprocess.run(cmd + ["--steps", "a", "g_backends"], cwd=tmp_path, env=_env_without_blues_installed(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, _explain(proc)
    rows = [json.loads(line) for line in (tmp_path / "gpu_check.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows} == {"a_env", "g_backends", "imports"}
    proc = subprocess.run(cmd + ["--steps", "b", "z_nothing"], cwd=tmp_path, env=_env_without_blues_installed(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, _explain(proc)
    assert "--steps b z_nothing: expected step names or letters" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr


KERNEL_TILES = os.path.join(ROOT, "benchmarks", "kernel_tiles.py")


@pytest.mark.slow
def test_kernel_tiles_smoke_sweeps_chooses_and_checks_outputs_and_gradients(tmp_path):
    # The tile sweep runs end to end before a GPU minute is spent on it (the interpreter ignores tiles,
    # so its timings mean nothing): sweep rows for every kind, a choice for every kind, and the final
    # side-by-side rows with each output and gradient checked against the table's.
    proc = subprocess.run([sys.executable, "-S", KERNEL_TILES, "--smoke", "--out", str(tmp_path)], cwd=tmp_path,
                          env=_env_without_blues_installed(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, _explain(proc)
    rows = [json.loads(line) for line in (tmp_path / "kernel_tiles.jsonl").read_text().splitlines()]
    assert [r for r in rows if r["status"] in ("fail", "error")] == []
    kinds = {"swiglu", "gemm", "swiglu_dx", "dw"}
    assert {r["tile_kind"] for r in rows if r["step"] == "sweep" and "fwd_bwd_ms" in r} == kinds
    (choice,) = [r for r in rows if r["step"] == "choose"]
    assert set(choice["tiles"]) == kinds and set(choice["per_shape"]["tiny"]) == kinds
    final = {r["name"]: r for r in rows if r["step"] == "final"}
    assert set(final) == {f"tiny-{n}" for n in ("triton_dw", "auto_dw", "chosen", "per_shape", "grouped_mm", "floor")}
    for name in ("triton_dw", "auto_dw", "chosen", "per_shape"):
        r = final[f"tiny-{name}"]
        assert r["output_ok"] is True and r["grad_rel_err"] <= 1e-4, r  # fp32: the same sums in another order


def test_kernel_tiles_gradient_check_catches_a_wrong_gradient(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    spec = importlib.util.spec_from_file_location("kernel_tiles_under_test", KERNEL_TILES)
    kt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kt)
    p = kt.ml.make_problem("tiny", "balanced", torch.float32, "cpu", 1.2)
    table = kt.gg.gpu_tiles()
    right, wrong = kt.TiledImpl(p, "right", table), kt.TiledImpl(p, "wrong", table)
    with torch.no_grad():
        wrong.inner.wd.mul_(1.1)  # a 10 % error in w_down moves the input and gate/up gradients by ~10 %
    errs = kt.tile_grad_errors([right, kt.TiledImpl(p, "same", table), wrong], p["dy"])
    assert errs["right"] == 0.0 and errs["same"] <= 1e-6 and errs["wrong"] > 0.05, errs
