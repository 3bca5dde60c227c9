"""What every Triton op in blues.kernels shares: is Triton usable here, and which kernel object runs.

Triton decides at decoration time whether `@triton.jit` builds a compiled kernel or a CPU
interpreter (it reads TRITON_INTERPRET when the decorator runs, triton/runtime/jit.py). A test that
sets TRITON_INTERPRET=1 after some other module imported blues.kernels would otherwise get compiled
kernels that cannot take CPU tensors. `runnable()` therefore looks at the environment at *launch*
time and rebuilds the kernel in the mode asked for, once, from the same Python function.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
from typing import NamedTuple

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
           "next_pow2", "round_bf16_rtne", "TritonUnavailableError", "record_launches", "compile_for_gpu",
           "cubin_resource_usage"]


@triton.jit
def round_bf16_rtne(x):
    """fp32 x rounded to the nearest bf16 value (ties to even), still as fp32, so that storing it to a
    bf16 tensor is exact. Triton's CPU interpreter converts fp32 -> bf16 by truncation and ignores
    fp_downcast_rounding (measured: half the values of a randn vector differ from torch's rounding),
    where a GPU rounds to nearest even; kernels whose bf16 stores feed further GEMMs call this under
    the interpreter so that the interpreter tests see the GPU's rounding. NaN/inf are not expected."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


class TritonUnavailableError(RuntimeError):
    """Raised by a Triton launcher that cannot run here (no Triton, or CPU tensors without the interpreter)."""


_RECORDER = None  # set by record_launches()


def interpret_mode() -> bool:
    """True when TRITON_INTERPRET asks for the CPU interpreter (read now, not at import)."""
    if _RECORDER is not None:
        return False  # record_launches() wants the launches a GPU would get
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
    if _RECORDER is not None:
        return
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{op}: all inputs must be on one device, got {sorted(str(d) for d in devices)}")
    device = next(iter(devices)) if devices else torch.device("cpu")
    if device.type != "cuda" and not interpret_mode():
        raise TritonUnavailableError(f"{op}: the Triton kernels need CUDA tensors, got device={device}; use "
                                     f"moe_backend='torch' on CPU, or set TRITON_INTERPRET=1 before the first "
                                     f"launch to run them in Triton's CPU interpreter (slow, for tests)")


_REBUILT: dict = {}
_INTERPRETED_COPIES: dict = {}


def _interpreted_copy(jit_fn):
    """One interpreted twin per @triton.jit function (identity matters: Triton's interpreter
    recognises its reduction combinators with `is`)."""
    from triton.runtime.interpreter import InterpretedFunction, InterpreterError, _patch_lang

    class _ScopedInterpretedFunction(InterpretedFunction):
        # A device-function call. Triton's own __call__ patches triton.language for the interpreter
        # and never restores it, which would break later compiled builds in this process.
        def __call__(self, *args, **kwargs):
            scope = _patch_lang(self.fn)
            try:
                return self.rewrite()(*args, **kwargs)
            except InterpreterError:
                raise
            except Exception as e:
                raise InterpreterError(repr(e)) from e
            finally:
                scope.restore()

    if jit_fn.fn not in _INTERPRETED_COPIES:
        _INTERPRETED_COPIES[jit_fn.fn] = _ScopedInterpretedFunction(jit_fn.fn)
    return _INTERPRETED_COPIES[jit_fn.fn]


class _InterpretedLaunch:
    """Runs a kernel that was decorated in compiled mode (TRITON_INTERPRET unset when its module, or
    triton itself, was imported) in Triton's CPU interpreter.

    The interpreter can only call @triton.jit functions that were themselves decorated in interpreter
    mode: Blues' helpers and triton.language's own (tl.argmax, tl.sum, tl.cumsum, ...). For the
    duration of the launch those names are swapped for interpreted twins, then put back, so the
    process can still compile kernels for a GPU afterwards (the sm_90 build tests do)."""

    def __init__(self, fn):
        import triton.language.random
        import triton.language.standard
        from triton.runtime.interpreter import InterpretedFunction
        from triton.runtime.jit import JITFunction

        self.kernel = InterpretedFunction(fn)
        self.swaps = []
        for namespace in (fn.__globals__, vars(triton.language), vars(triton.language.standard),
                          vars(triton.language.random)):
            for name, obj in list(namespace.items()):
                if isinstance(obj, JITFunction) and obj.fn is not fn:
                    self.swaps.append((namespace, name, obj, _interpreted_copy(obj)))

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            for namespace, name, _, twin in self.swaps:
                namespace[name] = twin
            try:
                return self.kernel[grid](*args, **kwargs)
            finally:
                for namespace, name, original, _ in self.swaps:
                    namespace[name] = original
        return launch


def runnable(kernel):
    """The kernel object to launch: `kernel` itself, or a copy built in the mode TRITON_INTERPRET asks now.

    (A module imported under TRITON_INTERPRET=1 and later launched on CUDA with it unset is not
    supported: Triton's own library would still be interpreted.)"""
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    if _RECORDER is not None:
        return _RecordingLaunch(kernel, _RECORDER)
    want_interp = interpret_mode()
    if isinstance(kernel, InterpretedFunction) == want_interp:
        return kernel
    key = (kernel.fn, want_interp)
    if key not in _REBUILT:
        _REBUILT[key] = _InterpretedLaunch(kernel.fn) if want_interp else JITFunction(kernel.fn)
    return _REBUILT[key]


class _RecordingLaunch:

    def __init__(self, kernel, sink: list):
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            fn = getattr(self.kernel, "fn", self.kernel)
            options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
            bound = inspect.signature(fn).bind(*args, **kwargs)
            self.sink.append(LaunchRecord(fn, tuple(grid), dict(bound.arguments), options))
        return launch


class LaunchRecord(NamedTuple):
    fn: object
    grid: tuple
    args: dict
    options: dict


@contextlib.contextmanager
def record_launches():
    """Within the block, every launch the Blues ops would make on a GPU (with the GPU tile configs)
    is recorded instead of run, and no device check applies: the tests compile each recorded launch
    for sm_90 on a CPU machine (`compile_for_gpu`). Outputs are left uninitialised."""
    global _RECORDER
    assert _RECORDER is None, "record_launches() does not nest"
    _RECORDER = []
    try:
        yield _RECORDER
    finally:
        _RECORDER = None


@functools.lru_cache(maxsize=None)
def next_pow2(n: int) -> int:
    """Smallest power of two >= n (Triton block shapes must be powers of two)."""
    return 1 << max(0, int(n) - 1).bit_length()


def compile_for_gpu(kernel, args: dict, arch: int = 90, **options):
    """Compile `kernel` ahead of time for an NVIDIA GPU of compute capability `arch` (90 = H100),
    down to a cubin with the ptxas that ships in the Triton wheel. Needs no GPU: the tests use it
    on CPU machines to show that every kernel also builds for the real target, which the CPU
    interpreter (permissive about types, block shapes and tl.dot sizes) cannot show.

    `args` maps every parameter to the value a launch would pass (CPU tensors stand in for device
    pointers); constexpr parameters take their value. Integers and pointers are specialised exactly
    as a real launch does (16-divisible values marked, the value 1 folded to a constant)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(kernel, "fn", kernel)
    jit_fn = triton.runtime.jit.JITFunction(fn)
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(jit_fn.params):
        value = args[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = value
            continue
        ty, spec = native_specialize_impl(BaseBackend, value, False, True, True)
        if ty == "constexpr":  # an integer 1
            signature[param.name] = "constexpr"
            constexprs[param.name] = spec
            continue
        signature[param.name] = ty
        if spec:
            attrs[(i,)] = BaseBackend.parse_attr(spec)
    src = ASTSource(jit_fn, signature, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options or None)


def cubin_resource_usage(compiled) -> dict:
    """Registers and spill stack of a compiled kernel, read from its cubin with the cuobjdump that
    ships in the Triton wheel: {'REG': int, 'STACK': int, 'SHARED': bytes of dynamic shared memory}."""
    import re
    import subprocess
    import tempfile

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    usage = {k: int(v) for k, v in re.findall(r"(REG|STACK):(\d+)", text)}
    usage["SHARED"] = compiled.metadata.shared
    return usage
