"""Triton kernels for MoE routing, dispatch and expert GEMMs, each beside its torch reference
(installed as blues.kernels). One op per name: `<op>()` launches the Triton kernels (CUDA, or Triton's
CPU interpreter under TRITON_INTERPRET=1), `<op>_ref()` is the plain-torch specification and Blues'
CPU path; both take the same arguments and return the same types.

    moe_route.py         moe_route, load_balancing_loss, z_loss
    moe_permute.py       moe_permute_indices, moe_permute, moe_unpermute_combine
    moe_grouped_gemm.py          moe_grouped_gemm (and the grouped-GEMM kernels the next two build on)
    moe_grouped_swiglu.py        moe_grouped_swiglu
    moe_grouped_down_combine.py  moe_grouped_down_combine
    triton_utils.py      triton_available, TritonUnavailableError, build checks for sm_90
"""
from .triton_utils import TritonUnavailableError, triton_available  # noqa: F401
