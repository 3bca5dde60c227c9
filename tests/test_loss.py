"""blues.loss: the fused, chunked linear + cross-entropy equals F.cross_entropy(h @ W.T) (its
specification), loss and both gradients, without the (N, V) logits."""
import pytest
import torch
import torch.nn.functional as F

from blues.loss import LMHead, chunk_rows, fused_linear_cross_entropy

torch.set_num_threads(1)


def reference(h, w, t):
    """The specification: the unfused loss over the full fp32 logits."""
    return F.cross_entropy((h.float() @ w.float().T), t, ignore_index=-1)


def inputs(N, D, V, dtype=torch.float32, ignored=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).to(dtype).requires_grad_(True)
    w = (torch.randn(V, D, generator=g) * 0.3).to(dtype).requires_grad_(True)
    t = torch.randint(0, V, (N,), generator=g)
    t[torch.rand(N, generator=g) < ignored] = -1
    return h, w, t


def loss_and_grads(fn, h, w, t):
    h, w = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    loss = fn(h, w, t)
    (loss * 1.7).backward()  # an incoming gradient other than 1: backward must scale by it
    return loss, h.grad, w.grad


# chunk_bytes such that a chunk is 7 rows at V=53: N=40 ends inside a chunk (40 = 5 * 7 + 5)
CHUNK_7 = 7 * 4 * 53


@pytest.mark.parametrize("N, ignored, chunk_bytes", [
    (40, 0.0, CHUNK_7),  # a chunk boundary inside the rows, the last chunk partial
    (40, 0.3, CHUNK_7),  # ignored targets, in several chunks
    (1, 0.0, CHUNK_7),  # one row
    (40, 0.3, 1),  # one row per chunk (chunk_rows never returns 0)
    (40, 0.3, 2 ** 30),  # one chunk holds every row
])
def test_fp32_loss_and_gradients_equal_the_unfused_cross_entropy(N, ignored, chunk_bytes):
    h, w, t = inputs(N, 24, 53, ignored=ignored)
    want = loss_and_grads(reference, h, w, t)
    got = loss_and_grads(lambda a, b, c: fused_linear_cross_entropy(a, b, c, chunk_bytes=chunk_bytes), h, w, t)
    for g, r, name in zip(got, want, ("loss", "grad h", "grad W")):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6, msg=name)  # fp32, another summation order


def test_every_row_ignored_gives_zero_loss_and_zero_gradients_not_nan():
    h, w, t = inputs(12, 8, 11)
    t[:] = -1
    loss, gh, gw = loss_and_grads(fused_linear_cross_entropy, h, w, t)
    assert reference(h, w, t).isnan()  # what F.cross_entropy does (0 / 0), hence the defined 0
    assert loss.item() == 0.0 and torch.equal(gh, torch.zeros_like(gh)) and torch.equal(gw, torch.zeros_like(gw))


def unfused_16bit(h, w, t):
    """The unfused head in h's dtype, as Blues runs it with fused_loss=false: 16-bit logits (fp32
    accumulation), their fp32 cross-entropy."""
    return F.cross_entropy((h @ w.T).float(), t, ignore_index=-1)


@pytest.mark.parametrize("dtype, ulp", [(torch.bfloat16, 2 ** -7), (torch.float16, 2 ** -10)])
@pytest.mark.parametrize("chunk_bytes", [CHUNK_7, 2 ** 30])
def test_16bit_gemms_give_the_unfused_16bit_loss_and_gradients(dtype, ulp, chunk_bytes):
    # 16-bit inputs: 16-bit GEMMs as the unfused head's, the softmax and the sums in fp32.
    h, w, t = inputs(40, 32, 53, dtype=dtype, ignored=0.2)
    want = loss_and_grads(unfused_16bit, h, w, t)
    got = loss_and_grads(lambda a, b, c: fused_linear_cross_entropy(a, b, c, chunk_bytes=chunk_bytes), h, w, t)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == dtype
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=0)  # the same 16-bit logits, fp32 sums reordered
    for g, r, name in zip(got[1:], want[1:], ("grad h", "grad W")):
        # Each path rounds to 16 bits once, at another point (the unfused one the scaled gradient of the
        # logits, this one the unscaled softmax gradient): at most one ulp of the largest gradient each
        # (0.84 ulp measured, 3 seeds, both dtypes).
        torch.testing.assert_close(g, r, rtol=0, atol=2 * ulp * r.float().abs().max().item(), msg=name)


def test_batched_rows_without_grad_and_bad_targets():
    h, w, t = inputs(2 * 9, 16, 29, ignored=0.2)
    with torch.no_grad():
        got = fused_linear_cross_entropy(h.view(2, 9, 16), w, t.view(2, 9), chunk_bytes=5 * 4 * 29)
    torch.testing.assert_close(got, reference(h, w, t), rtol=1e-5, atol=1e-6)  # fp32, another summation order
    assert got.grad_fn is None
    with pytest.raises(ValueError, match=r"targets of shape \(2, 8\) do not match hidden states of shape "
                                         r"\(2, 9, 16\)"):
        fused_linear_cross_entropy(h.view(2, 9, 16), w, t[:16].view(2, 8))


def test_default_chunk_bytes_is_the_measured_budget_on_cpu_and_the_hidden_states_size_on_a_gpu():
    from blues.loss import CHUNK_BYTES, default_chunk_bytes
    assert default_chunk_bytes(16384, 2048, torch.device("cpu")) == CHUNK_BYTES
    # 16384 rows of width 2048 on a GPU: 128 MiB of logits, 1024 rows a chunk at V=32768 (16 chunks)
    assert default_chunk_bytes(16384, 2048, torch.device("cuda")) == 4 * 16384 * 2048
    assert chunk_rows(32768, default_chunk_bytes(16384, 2048, torch.device("cuda"))) == 1024
    assert default_chunk_bytes(8, 64, torch.device("cuda")) == CHUNK_BYTES  # never below the CPU budget


def test_chunk_rows_keeps_a_chunk_of_logits_under_the_budget():
    assert chunk_rows(4096) == 256  # 4 MiB of fp32 logits at the tiny preset's vocabulary
    assert chunk_rows(200_000) == 5
    assert chunk_rows(10 ** 9) == 1


def test_lm_head_is_a_linear_whose_targets_give_the_fused_loss():
    torch.manual_seed(0)
    head = LMHead(16, 29, bias=False)
    h, _, t = inputs(10, 16, 29, ignored=0.2)
    assert isinstance(head, torch.nn.Linear) and list(head.state_dict()) == ["weight"]
    torch.testing.assert_close(head(h), h @ head.weight.T, rtol=0, atol=0)
    torch.testing.assert_close(head(h, t), reference(h, head.weight, t), rtol=1e-5, atol=1e-6)  # fp32 order


def test_an_outer_bf16_autocast_does_not_lower_the_logits_precision():
    h, w, t = inputs(40, 24, 53, ignored=0.2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert (h @ w.T).dtype == torch.bfloat16  # what autocast would do to the chunk GEMMs
        got = loss_and_grads(lambda a, b, c: fused_linear_cross_entropy(a, b, c, chunk_bytes=CHUNK_7), h, w, t)
    want = loss_and_grads(reference, h, w, t)
    for g, r, name in zip(got, want, ("loss", "grad h", "grad W")):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6, msg=name)  # fp32, another summation order


def test_no_rows_gives_zero_loss_and_zero_gradients():
    h, w, t = inputs(0, 8, 11)  # an empty batch: the first chunk that writes the weight's gradient never runs
    loss, gh, gw = loss_and_grads(fused_linear_cross_entropy, h, w, t)
    assert loss.item() == 0.0 and gh.shape == (0, 8) and torch.equal(gw, torch.zeros_like(gw))
