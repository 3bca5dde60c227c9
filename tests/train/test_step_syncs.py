"""Host synchronisation in the training step (issue 11, part 6), counted on a real DeepSpeed engine:
Blues' own step code copies the metric sums (the non-finite flag among them) once per step and reads
nothing between forward and backward where DeepSpeed skips non-finite gradients itself (ZeRO 2, the
default); under ZeRO 0 in fp32 it also reads the all-reduced non-finite flag once per micro-batch,
before backward. Nothing else of its own waits on the device."""
import json
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, sys, torch
from blues.presets import tiny
from blues import train as T
import blues.train.step as step_module
from blues.train.ds_config import BUILTIN_DS_CONFIG

dist = T.init_distributed()
cfg = tiny().replace(n_embd=32, n_head=2, block_size=16, micro_batch_size=2, expert_ffn_size=32, num_experts=4,
                     grad_accum=3, out_dir=sys.argv[1])
ds = dict(BUILTIN_DS_CONFIG, zero_optimization={"stage": int(sys.argv[2])})
run = T.build_engine(cfg, ds, dist=dist, with_data=False)
T.train_steps(run, 1)  # warm up outside the count
events = []
STEP_FILE = step_module.__file__


def counted(name, original):
    def wrapper(self, *a, **k):
        if sys._getframe(1).f_code.co_filename == STEP_FILE:  # Blues' step code, not DeepSpeed's
            events.append(name)
        return original(self, *a, **k)
    return wrapper


for name in ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__"):
    setattr(torch.Tensor, name, counted(name, getattr(torch.Tensor, name)))
engine = run.engine
for name in ("forward", "backward", "step"):
    original = getattr(engine, name)
    setattr(engine, name, (lambda n, f: lambda *a, **k: (events.append(n), f(*a, **k))[1])(name, original))
res = T.train_step(run)
print("RESULTS " + json.dumps({"events": events, "loss": res.loss, "skipped": res.skipped}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage,micro_batch", [
    (2, ["forward", "backward", "step"]),  # nothing read between forward and backward
    (0, ["forward", "item", "backward", "step"]),  # fp32 ZeRO 0 would apply non-finite gradients: read first
])
def test_host_reads_per_micro_batch_and_one_copy_per_step(tmp_path, stage, micro_batch):
    p = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(stage)], capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    r = json.loads(next(line for line in p.stdout.splitlines() if line.startswith("RESULTS "))[8:])
    ev = r["events"]
    loop = ev[:ev.index("cpu")]
    assert loop == micro_batch * 3, ev  # grad_accum=3
    assert ev.count("cpu") == 1, ev  # the metric sums, once per step; what follows reads that host copy
    assert r["loss"] == r["loss"] and r["skipped"] is False  # finite
