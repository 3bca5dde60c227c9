"""moe_grouped_gemm: one matmul per expert over its contiguous block of permuted rows.

Shapes: N rows in expert order, E experts, D_in / D_out widths.

Contract (reference `moe_grouped_gemm_ref`, the specification):
    x               (N, D_in)
    expert_offsets  (E+1,) int64   expert e owns rows [expert_offsets[e], expert_offsets[e+1])
    w               (E, D_in, D_out)
  returns (N, D_out): rows of expert e are x_rows @ w[e]; rows at or past expert_offsets[E]
  (dropped assignments) are zero. Gradients flow to x and w.
"""
from __future__ import annotations

import torch


def moe_grouped_gemm_ref(x: torch.Tensor, expert_offsets: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    assert x.dim() == 2 and w.dim() == 3 and x.shape[1] == w.shape[1], (tuple(x.shape), tuple(w.shape))
    E = w.shape[0]
    assert expert_offsets.numel() == E + 1
    # NOTE: the split sizes need one host sync; the Triton path has none. Each expert's weight comes
    # from unbind() rather than w[e]: indexing w[e] makes every backward write a full-size zero
    # gradient (6.4 s vs 0.9 s at E=64, see shared notes).
    bounds = expert_offsets.tolist()
    sizes = [bounds[e + 1] - bounds[e] for e in range(E)] + [x.shape[0] - bounds[E]]
    chunks = x.split(sizes, dim=0)
    outs = [chunk @ we for chunk, we in zip(chunks[:E], w.unbind(0))]
    outs.append(x.new_zeros(sizes[E], w.shape[2]))
    return torch.cat(outs, dim=0)  # (N, D_out)
