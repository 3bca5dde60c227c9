"""Shared by the vision tests: a tiny vision-language config and its tokenizer."""
import pytest
import torch


def tiny_vl(**overrides):
    """A vision-language Blues small enough for a CPU test: 16 px images in 4 px patches, merged 2x2
    into 4 image tokens; the default tokenizer plus the three image tokens (4099 ids, <|image|> = 4097)."""
    from blues.presets import tiny
    kw = dict(vocab_size=4099, image_token_id=4097, n_embd=32, n_head=2, num_kv_heads=1, expert_ffn_size=32,
              num_experts=4, block_size=48, balance_bias_rate=0.0, vision_enabled=True, image_size=16, patch_size=4,
              merge_patches=True, vision_n_layer=2, vision_n_embd=32, vision_n_head=2, vision_ffn_size=32)
    kw.update(overrides)
    return tiny().replace(**kw)


@pytest.fixture
def vl_tokenizer():
    from blues.data.images import with_image_tokens
    return with_image_tokens("default")


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)
