"""fairseq's own transformer layers, several at once, for the diagonal schedule (modules/recurrence.py): layers
first .. first+G-1 of a fairseq TransformerEncoder or TransformerDecoder (no encoder attention), each on its own
segment, as one batched call with the layers' weights stacked (recurrence.stack_layers), eval mode (no dropout).

Legend: G layers in the call, B streams, N rows of a segment, C model dim, H heads, D = C / H.

The operations are TransformerEncoderLayerBase.forward's and TransformerDecoderLayerBase.forward's (post- or
pre-norm), fairseq's MultiheadAttention as torch's scaled_dot_product_attention with the same additive mask
(F.multi_head_attention_forward's). NormFormer's extra norms and head scales, residual weights and cross
self-attention are not written here: `plain` is False for such layers and the model stays sequential.
ARMT's associative reads and writes are not here either: the models call their blocks per layer
(associative.read_layers / write_layers), as their
sequential forward does (in fp32 a bmm over G x B matrices rounds differently from one over B, and the
associative read amplifies such differences from segment to segment).
"""

from typing import Dict, Optional

import torch
import torch.nn.functional as F


def plain(layer) -> bool:
    """Whether `batched` computes this fairseq layer: no NormFormer norms or head scales, no residual weights, no
    cross self-attention, no encoder attention in use."""
    return (getattr(layer, "c_attn", None) is None and getattr(layer, "attn_ln", None) is None
            and getattr(layer, "ffn_layernorm", None) is None and getattr(layer, "w_resid", None) is None
            and not getattr(layer, "cross_self_attention", False))


def batched(layer, w: Dict[str, torch.Tensor], x: torch.Tensor, attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """x G x B x N x C through G layers shaped like `layer` (its flags, its heads, its activation), whose weights
    `w` are stacked G x ... under the layer's parameter names -> G x B x N x C.

    attn_mask: None, or (G*B) x 1 x N x N (or broadcastable to it): bool (True: attend) or additive float."""
    G, B, N, C = x.shape
    H = layer.self_attn.num_heads
    D = C // H

    def lin(y, name):  # fairseq's Linear (with bias) per layer: G x B x n x C_in -> G x B x n x C_out
        flat = y.reshape(G, -1, y.size(-1))
        out = torch.baddbmm(w[name + ".bias"].unsqueeze(1), flat, w[name + ".weight"].transpose(-1, -2))
        return out.view(*y.shape[:-1], out.size(-1))

    def norm(y, name):  # LayerNorm per layer: one fused call each, as the layer's own
        eps = getattr(layer, name).eps
        return torch.stack([F.layer_norm(y[g], (C,), w[name + ".weight"][g], w[name + ".bias"][g], eps)
                            for g in range(G)])

    pre = layer.normalize_before
    residual = x
    y = norm(x, "self_attn_layer_norm") if pre else x
    heads = lambda t: t.reshape(G * B, N, H, D).transpose(1, 2)  # noqa: E731  (G*B) x H x N x D
    q, k, v = (heads(lin(y, f"self_attn.{n}_proj")) for n in "qkv")
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (G*B) x H x N x D
    x = residual + lin(out.transpose(1, 2).reshape(G, B, N, C), "self_attn.out_proj")
    if not pre:
        x = norm(x, "self_attn_layer_norm")
    residual = x
    y = norm(x, "final_layer_norm") if pre else x
    x = residual + lin(layer.activation_fn(lin(y, "fc1")), "fc2")
    if not pre:
        x = norm(x, "final_layer_norm")
    return x
