"""The partial prefix pass of VLA-Cache token reuse: each VLM layer recomputes only the tokens a `TokenReuse`
plan keeps active and reads the K/V of the others from the previous frame's cache."""
from __future__ import annotations

import torch
from torch import Tensor

from policies.pi05.layers import GemmaModel, apply_rope, prefix_layer_rest
from policies.pi05.stages import AttentionCallback, PrefixKV, TokenReuse


def partial_prefix_kv(
    vlm: GemmaModel,
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
    reuse: TokenReuse,
    want: frozenset[int],
    hooked: frozenset[int],
    on_attention: AttentionCallback | None,
) -> PrefixKV:
    """`Pi05Model.compute_prefix_kv(prefix, reuse=...)` after its setup (a checked plan, batch 1).

    From the layer where a token leaves `reuse.active` its hidden state is dropped, so no projection,
    attention query or MLP is computed for it in that layer or deeper; its K/V there are the cache's, and
    the recomputed tokens attend to the merged K/V. Layers before the first drop compute every token, exactly
    as the full pass does. Queries are the active tokens in index order (passed to `on_attention`).
    """
    # x: [1, Tp, W]; cos, sin: [1, 1, Tp, D]; mask: [1, 1, Tp, Tp] additive
    cfg = vlm.config
    active: Tensor | None = None  # [Q] indices of the tokens x holds; None = all Tp
    keys, values, maps = [], [], []
    for i, layer in enumerate(vlm.layers):
        if reuse.active[i] is not None and reuse.active[i] is not active:
            # drop the hidden states of the tokens that leave here (the set only shrinks with depth)
            keep = reuse.active[i].to(x.device)
            rows = keep if active is None else torch.searchsorted(active, keep)
            x = x.index_select(1, rows)
            cos, sin = cos.index_select(2, rows), sin.index_select(2, rows)
            mask = mask.index_select(2, rows)  # [1, 1, Q, Tp]: active queries over all keys
            active = keep
        h, _ = layer.input_layernorm(x)
        q, k, v = layer.self_attn.qkv(h)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if active is not None:
            # merged K/V: fresh for recomputed tokens, the cache's for dropped ones (a new tensor: the
            # cache is never written)
            k = reuse.cache.keys[i].index_copy(2, active, k)
            v = reuse.cache.values[i].index_copy(2, active, v)
        keys.append(k)
        values.append(v)
        x, probs = prefix_layer_rest(layer, x, q, k, v, mask, cfg.head_dim, i < cfg.depth - 1, i in want or i in hooked)
        if i in hooked:
            on_attention(i, probs, active)
        maps.append(probs if i in want else None)
    return PrefixKV(keys=tuple(keys), values=tuple(values), attention=tuple(maps) if want else None)
