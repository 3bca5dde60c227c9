"""What every Triton op in blues.kernels shares: is Triton usable here, and which kernel object runs.

Triton decides at decoration time whether `@triton.jit` builds a compiled kernel or a CPU
interpreter (it reads TRITON_INTERPRET when the decorator runs, triton/runtime/jit.py). A test that
sets TRITON_INTERPRET=1 after some other module imported blues.kernels would otherwise get compiled
kernels that cannot take CPU tensors. `runnable()` therefore looks at the environment at *launch*
time and rebuilds the kernel in the mode asked for, once, from the same Python function.
"""
from __future__ import annotations

import functools
import os

import torch

try:  # Triton ships for Linux only (setup.py); the torch references work without it.
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only where Triton is not installed
    HAS_TRITON = False

    class _TritonStub:
        """Lets the kernel modules define their @triton.jit functions; nothing can launch them."""

        @staticmethod
        def jit(fn=None, **_):
            return fn if fn is not None else (lambda f: f)

    triton = _TritonStub()
    tl = None

__all__ = ["HAS_TRITON", "triton", "tl", "triton_available", "interpret_mode", "check_triton_inputs", "runnable",
           "next_pow2", "TritonUnavailableError"]


class TritonUnavailableError(RuntimeError):
    """Raised by a Triton launcher that cannot run here (no Triton, or CPU tensors without the interpreter)."""


def interpret_mode() -> bool:
    """True when TRITON_INTERPRET asks for the CPU interpreter (read now, not at import)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def triton_available(device: torch.device | str | None = None) -> bool:
    """Can the Triton MoE ops run on `device` (default: CUDA when present, else CPU)?

    True on a CUDA device with Triton installed, or anywhere when TRITON_INTERPRET=1 (slow: tests only).
    """
    if not HAS_TRITON:
        return False
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if interpret_mode():
        return True
    return device.type == "cuda" and torch.cuda.is_available()


def check_triton_inputs(op: str, *tensors: torch.Tensor) -> None:
    """Raise one clear error when `op` cannot launch on these tensors."""
    if not HAS_TRITON:
        raise TritonUnavailableError(f"{op}: Triton is not installed; use moe_backend='torch' "
                                     f"(the {op}_ref path) or install triton (Linux only)")
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{op}: all inputs must be on one device, got {sorted(str(d) for d in devices)}")
    device = next(iter(devices)) if devices else torch.device("cpu")
    if device.type != "cuda" and not interpret_mode():
        raise TritonUnavailableError(f"{op}: the Triton kernels need CUDA tensors, got device={device}; use "
                                     f"moe_backend='torch' on CPU, or set TRITON_INTERPRET=1 before the first "
                                     f"launch to run them in Triton's CPU interpreter (slow, for tests)")


_REBUILT: dict = {}


def runnable(kernel):
    """The kernel object to launch: `kernel` itself, or a copy built in the mode TRITON_INTERPRET asks now."""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    want_interp = interpret_mode()
    if isinstance(kernel, InterpretedFunction) == want_interp:
        return kernel
    key = (kernel.fn, want_interp)
    if key not in _REBUILT:
        _REBUILT[key] = InterpretedFunction(kernel.fn) if want_interp else JITFunction(kernel.fn)
    return _REBUILT[key]


@functools.lru_cache(maxsize=None)
def next_pow2(n: int) -> int:
    """Smallest power of two >= n (Triton block shapes must be powers of two)."""
    return 1 << max(0, int(n) - 1).bit_length()


def compile_for_gpu(kernel, signature: dict, constexprs: dict, arch: int = 90):
    """Compile `kernel` ahead of time for an NVIDIA GPU of compute capability `arch` (90 = H100),
    down to a cubin with the ptxas that ships in the Triton wheel. Needs no GPU: the tests use it
    on CPU machines to prove that every kernel also builds for the real target, which the CPU
    interpreter (permissive about types, block shapes and tl.dot sizes) cannot show."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(kernel, "fn", kernel)
    jit_fn = triton.runtime.jit.JITFunction(fn)
    sig = dict(signature)
    sig.update({name: "constexpr" for name in constexprs})
    return triton.compile(ASTSource(jit_fn, sig, dict(constexprs)), target=GPUTarget("cuda", arch, 32))
