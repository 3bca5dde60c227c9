"""Text generation for Blues models (the `blues-generate` CLI is blues/cli/generate.py).

Arguments follow Hugging Face's names (max_new_tokens, temperature, top_k, top_p,
eos_token_id, use_cache); `output_len` (the Blues-01 name) is accepted for max_new_tokens.

A vision model also takes `images=[...]` with one prompt: each image becomes the span
<|image_start|> <|image|>*n <|image_end|>, put where the prompt text says <|image|> (one marker per
image) or, when it says none, before the text; the span is prefilled once into the KV cache.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch

Prompt = Union[str, Sequence[int], Sequence[str], Sequence[Sequence[int]], torch.Tensor]


def check_sampling_args(temperature, top_k, top_p, max_new_tokens) -> None:
    """ValueError naming the first sampling setting that generate() cannot use (the REPL checks its /commands here)."""
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} is invalid: expected an integer >= 0")
    if temperature is None or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature={temperature!r} is invalid: expected a number >= 0 (0 = greedy)")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} is invalid: expected an integer >= 1, or None")
    if top_p is not None and not (0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r} is invalid: expected a number in (0, 1], or None")


def sample_next(logits: torch.Tensor, temperature: float, top_k: Optional[int], top_p: Optional[float],
                generator: Optional[torch.Generator]) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,). temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first token always stays).
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _normalise_prompt(prompt: Prompt, tokenizer) -> tuple[list[list[int]], str]:
    """-> (token lists, kind) where kind is 'str', 'strs', 'ids' or 'batch'."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a string prompt needs a tokenizer: pass tokenizer=... or load the model with "
                             "from_pretrained from a folder that holds one")
        return [tokenizer.encode(prompt)], "str"
    if isinstance(prompt, torch.Tensor):
        if prompt.dim() == 1:
            return [prompt.tolist()], "ids"
        if prompt.dim() == 2:
            return [row.tolist() for row in prompt], "batch"
        raise ValueError(f"a tensor prompt must be (T,) or (B, T), got shape {tuple(prompt.shape)}")
    prompt = list(prompt)
    if prompt and all(isinstance(p, str) for p in prompt):
        if tokenizer is None:
            raise ValueError("string prompts need a tokenizer")
        return [tokenizer.encode(p) for p in prompt], "strs"
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)], "ids"
    if all(isinstance(p, (list, tuple)) for p in prompt):
        return [list(p) for p in prompt], "batch"
    raise ValueError("prompt must be a string, a list of strings, a list of token ids, or a list of such lists")


def _image_prompt(model, prompt, kind: str, ids: list[int], images, tokenizer) -> tuple[list[int], torch.Tensor]:
    """(prompt ids with the image spans in place, pixels (M, 3, S, S)) for one prompt and its images."""
    from blues.data.images import image_span_ids
    from blues.vision.config import IMAGE, num_image_tokens
    from blues.vision.images import to_pixels
    vision = model.config.vision
    if getattr(model, "vision", None) is None:
        raise ValueError("images were given but the model is text-only (vision_enabled=false)")
    if tokenizer is None and (kind == "str" or vision.image_token_id not in ids):
        raise ValueError("a prompt with images needs the model's tokenizer (with its image tokens) to place the "
                         "image spans: pass tokenizer=..., or token ids holding the spans already")
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        images = list(images)
    if not isinstance(images, (list, tuple)) or not images:
        raise ValueError("images must be a non-empty list of PIL images, HxWx3 uint8 arrays or (3, H, W) tensors")
    pixels = torch.stack([to_pixels(im, vision.image_size) for im in images])  # (M, 3, S, S)
    M, n = len(images), num_image_tokens(vision)
    if kind == "str":
        pieces = prompt.split(IMAGE)
        if len(pieces) == 1:  # no marker: the images go before the text
            pieces = [""] * M + pieces
        elif len(pieces) - 1 != M:
            raise ValueError(f"prompt has {len(pieces) - 1} {IMAGE} marker(s) but {M} image(s): give one image per "
                             f"marker, or no marker to put the images before the text")
        span = image_span_ids(tokenizer, n)
        ids = list(tokenizer.encode(pieces[0]))
        for piece in pieces[1:]:
            ids += span + list(tokenizer.encode(piece))
    elif vision.image_token_id not in ids:  # token ids without placeholders: the spans go first
        ids = image_span_ids(tokenizer, n) * M + list(ids)
    placeholders = sum(t == vision.image_token_id for t in ids)
    if placeholders != M * n:
        raise ValueError(f"prompt has {placeholders} image placeholders but {M} image(s): each image fills {n} "
                         f"{IMAGE} placeholders (expected {M * n})")
    return ids, pixels.to(model.tok_emb.weight.device)


def _check_no_image_marker(model, prompt, kind: str, seqs: list[list[int]], tokenizer) -> None:
    """ValueError for a prompt that holds an image placeholder (or its text marker) but no image."""
    from blues.vision.config import IMAGE
    tid = model.config.vision.image_token_id
    texts = [prompt] if kind == "str" else (list(prompt) if kind == "strs" else [])
    has_marker = getattr(model, "vision", None) is not None and any(IMAGE in t for t in texts)
    if has_marker or (tid is not None and any(tid in s for s in seqs)):
        raise ValueError(f"prompt has an image placeholder ({IMAGE}) but no image: pass images=[...] (one per "
                         "placeholder span), or remove the placeholder")


@torch.no_grad()
def _generate_ids(model, ids: list[list[int]], max_new_tokens: int, temperature: float, top_k, top_p,
                  eos: set[int], generator, use_cache: bool,
                  images: Optional[torch.Tensor] = None) -> Iterator[torch.Tensor]:
    """Yields the next token of every sequence, (B,) per step; sequences share one length. With
    images (M, 3, S, S) generation ends when the sequence fills block_size: a sliding window would
    cut the image span."""
    device = model.tok_emb.weight.device
    block = model.config.model.block_size
    x = torch.tensor(ids, dtype=torch.long, device=device)  # (B, T)
    B = x.shape[0]
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    cache = model.new_kv_cache(B) if use_cache else None
    logits = model(x, kv_cache=cache, images=images).logits[:, -1]  # (B, V)
    seq = x
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, generator)  # (B,)
        yield nxt
        if eos:
            finished |= torch.isin(nxt, torch.tensor(sorted(eos), device=device))
            if bool(finished.all()):
                return
        seq = torch.cat([seq, nxt[:, None]], dim=1)
        if step == max_new_tokens - 1:
            return
        if cache is not None and cache.pos < block:
            logits = model(nxt[:, None], kv_cache=cache).logits[:, -1]
        elif images is not None:
            if seq.shape[1] > block:
                return
            logits = model(seq, images=images).logits[:, -1]
        else:
            # No cache, or the context is full: recompute over the last block_size tokens.
            cache = None
            logits = model(seq[:, -block:]).logits[:, -1]


def generate(model, prompt: Prompt, max_new_tokens: Optional[int] = None, *, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None,
             eos_token_id: Union[int, Sequence[int], None] = None, seed: Optional[int] = None,
             stream: bool = False, use_cache: bool = True, tokenizer=None, output_len: Optional[int] = None,
             on_token: Optional[Callable[[int], None]] = None, images: Optional[Sequence[Any]] = None):
    """Continue `prompt` with up to max_new_tokens sampled tokens.

    prompt: a string or list of strings (decoded text is returned), token ids (B=1) or a batch of
    token-id lists / a (B, T) tensor (new token ids are returned, per sequence). Generation stops
    at an eos token (not included in the output); with a tokenizer, eos defaults to <|endoftext|>.
    stream=True returns an iterator of new pieces (text for string prompts, ids otherwise; B=1), and
    calls on_token(id) with each new token as it is made (eos excluded): a text piece may hold several
    tokens, or wait for the next one to complete a character, so counting pieces does not count tokens.
    images (vision models, one prompt): PIL images, HxWx3 uint8 arrays or (3, H, W) tensors, resized to
    image_size; see the module docstring for where their spans go.
    """
    if on_token is not None and not stream:
        raise ValueError("on_token is called while streaming: pass stream=True with it")
    if max_new_tokens is None:
        max_new_tokens = output_len if output_len is not None else 64
    elif output_len is not None and output_len != max_new_tokens:
        raise ValueError(f"max_new_tokens={max_new_tokens} and output_len={output_len} disagree: give one")
    check_sampling_args(temperature, top_k, top_p, max_new_tokens)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    seqs, kind = _normalise_prompt(prompt, tokenizer)
    pixels = None
    if images is not None:
        if len(seqs) != 1:
            raise ValueError(f"images= goes with one prompt, got {len(seqs)} prompts")
        seqs[0], pixels = _image_prompt(model, prompt, kind, seqs[0], images, tokenizer)
    else:
        _check_no_image_marker(model, prompt, kind, seqs, tokenizer)
    block, V = model.config.model.block_size, model.config.model.vocab_size
    for s in seqs:
        if len(s) == 0:
            raise ValueError("prompt is empty: give at least one token")
        if len(s) > block:
            raise ValueError(f"prompt has {len(s)} tokens, more than block_size={block}")
        bad = [t for t in s if not 0 <= t < V]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {V})")
    if eos_token_id is None:
        eos = {tokenizer.eot_id} if tokenizer is not None and hasattr(tokenizer, "eot_id") else set()
    else:
        eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id)
    generator = None
    if seed is not None:
        generator = torch.Generator(device=model.tok_emb.weight.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        if stream:
            if len(seqs) != 1:
                raise ValueError(f"stream=True takes one prompt, got {len(seqs)}")
            return _stream(model, seqs[0], kind, max_new_tokens, temperature, top_k, top_p, eos, generator,
                           use_cache, tokenizer, was_training, on_token, pixels)
        # Prompts of equal length run as one batch; different lengths run in groups of equal length
        # (no padding, so RoPE positions and the cache stay exact).
        results: list[list[int]] = [[] for _ in seqs]
        groups: dict[int, list[int]] = {}
        for i, s in enumerate(seqs):
            groups.setdefault(len(s), []).append(i)
        for members in groups.values():
            done = [False] * len(members)
            for nxt in _generate_ids(model, [seqs[i] for i in members], max_new_tokens, temperature, top_k,
                                     top_p, eos, generator, use_cache, pixels):
                for j, tok in enumerate(nxt.tolist()):
                    if done[j]:
                        continue
                    if tok in eos:
                        done[j] = True
                    else:
                        results[members[j]].append(tok)
    finally:
        if not stream:
            model.train(was_training)
    if kind == "str":
        return tokenizer.decode(results[0])
    if kind == "strs":
        return [tokenizer.decode(r) for r in results]
    if kind == "ids":
        return results[0]
    return results


def _stream(model, ids, kind, max_new_tokens, temperature, top_k, top_p, eos, generator, use_cache, tokenizer,
            was_training, on_token, pixels=None):
    try:
        new: list[int] = []
        emitted = ""
        for nxt in _generate_ids(model, [ids], max_new_tokens, temperature, top_k, top_p, eos, generator,
                                 use_cache, pixels):
            tok = int(nxt[0])
            if tok in eos:
                break
            if on_token is not None:
                on_token(tok)
            if kind == "str":
                new.append(tok)
                text = tokenizer.decode(new)
                # Hold back a piece that ends inside a multi-byte character (decoded as U+FFFD).
                if not text.endswith("\ufffd"):
                    yield text[len(emitted):]
                    emitted = text
            else:
                yield tok
        if kind == "str":
            text = tokenizer.decode(new)
            if len(text) > len(emitted):
                yield text[len(emitted):]
    finally:
        model.train(was_training)

