"""The device a kernel test runs on: Triton's CPU interpreter everywhere, and CUDA without the
interpreter where a GPU is present (marked `gpu`, so CI on a CPU machine skips it by design). The
same cases and per-dtype tolerances run on both: the interpreter upcasts bf16 dots and truncates
bf16 stores (see kernels/moe_grouped_gemm.py _dot_flags), so only the CUDA run tests the GPU path."""
import pytest
import torch


@pytest.fixture(params=[
    "interpreter",
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]),
])
def device(request, monkeypatch) -> torch.device:
    if request.param == "cuda":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the compiled kernels, as in training
        return torch.device("cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    return torch.device("cpu")
