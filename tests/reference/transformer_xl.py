"""Reference Transformer-XL block, ported from the authors' code, for parity tests of rmt_lm.

Source: booydar/LM-RMT, pytorch/mem_transformer.py (commit e289508), which is kimiyoung/transformer-xl's
pytorch/mem_transformer.py plus memory tokens. Copyright the Transformer-XL authors and the LM-RMT authors,
licensed under the Apache License, Version 2.0 (http://www.apache.org/licenses/LICENSE-2.0). Changes: trimmed
to attn_type 0 (relative partial-learnable attention), pre_lnorm False, ext_len 0, no memory tokens; the
embedding is an input (XL's word_emb output) instead of XL's AdaptiveEmbedding; empty mems are 0 x B x C
tensors instead of 1-D empty ones; `xl_block_train_reference` is new (see its docstring).

Legend: T segment tokens, B batch, C model dim, H heads, D head dim, L cache length (mlen), K = L + T keys,
N query rows, P relative-distance table rows.

`XLBlock` keeps XL's T x B x C layout and its rel-shift trick: it is an implementation independent of
rmt_fairseq/modules/relative_attention.py (which gathers from an explicit distance index, B-first).
"""

from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F


class PositionalEmbedding(nn.Module):
    def __init__(self, demb):
        super(PositionalEmbedding, self).__init__()

        self.demb = demb

        inv_freq = 1 / (10000 ** (torch.arange(0.0, demb, 2.0) / demb))
        self.register_buffer("inv_freq", inv_freq)

    def forward(self, pos_seq, bsz=None):
        sinusoid_inp = torch.ger(pos_seq, self.inv_freq)
        pos_emb = torch.cat([sinusoid_inp.sin(), sinusoid_inp.cos()], dim=-1)

        if bsz is not None:
            return pos_emb[:, None, :].expand(-1, bsz, -1)
        else:
            return pos_emb[:, None, :]  # P x 1 x C


class PositionwiseFF(nn.Module):
    def __init__(self, d_model, d_inner, dropout):
        super(PositionwiseFF, self).__init__()

        self.d_model = d_model
        self.d_inner = d_inner
        self.dropout = dropout

        self.CoreNet = nn.Sequential(
            nn.Linear(d_model, d_inner),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(d_inner, d_model),
            nn.Dropout(dropout),
        )

        self.layer_norm = nn.LayerNorm(d_model)

    def forward(self, inp):
        ##### positionwise feed-forward
        core_out = self.CoreNet(inp)

        ##### residual connection + layer normalization
        output = self.layer_norm(inp + core_out)

        return output


class RelMultiHeadAttn(nn.Module):
    def __init__(self, n_head, d_model, d_head, dropout, dropatt=0):
        super(RelMultiHeadAttn, self).__init__()

        self.n_head = n_head
        self.d_model = d_model
        self.d_head = d_head
        self.dropout = dropout

        self.qkv_net = nn.Linear(d_model, 3 * n_head * d_head, bias=False)

        self.drop = nn.Dropout(dropout)
        self.dropatt = nn.Dropout(dropatt)
        self.o_net = nn.Linear(n_head * d_head, d_model, bias=False)

        self.layer_norm = nn.LayerNorm(d_model)

        self.scale = 1 / (d_head**0.5)

    @staticmethod
    def _rel_shift(x, zero_triu=False):
        # x: qlen x klen x ..., column c holding distance klen-1-c; after the shift, entry (i, j) holds distance
        # (klen - qlen + i) - j for j <= klen - qlen + i (the rest is garbage, masked by the caller)
        zero_pad = torch.zeros((x.size(0), 1, *x.size()[2:]), device=x.device, dtype=x.dtype)
        x_padded = torch.cat([zero_pad, x], dim=1)

        x_padded = x_padded.view(x.size(1) + 1, x.size(0), *x.size()[2:])

        x = x_padded[1:].view_as(x)

        if zero_triu:
            ones = torch.ones((x.size(0), x.size(1)))
            x = x * torch.tril(ones, x.size(1) - x.size(0))[:, :, None, None]

        return x


class RelPartialLearnableMultiHeadAttn(RelMultiHeadAttn):
    def __init__(self, *args, **kwargs):
        super(RelPartialLearnableMultiHeadAttn, self).__init__(*args, **kwargs)

        self.r_net = nn.Linear(self.d_model, self.n_head * self.d_head, bias=False)

    def forward(self, w, r, r_w_bias, r_r_bias, attn_mask=None, mems=None):
        qlen, rlen, bsz = w.size(0), r.size(0), w.size(1)

        if mems is not None:
            cat = torch.cat([mems, w], 0)
            w_heads = self.qkv_net(cat)
            r_head_k = self.r_net(r)

            w_head_q, w_head_k, w_head_v = torch.chunk(w_heads, 3, dim=-1)
            w_head_q = w_head_q[-qlen:]
        else:
            w_heads = self.qkv_net(w)
            r_head_k = self.r_net(r)

            w_head_q, w_head_k, w_head_v = torch.chunk(w_heads, 3, dim=-1)

        klen = w_head_k.size(0)

        w_head_q = w_head_q.view(qlen, bsz, self.n_head, self.d_head)  # qlen x bsz x n_head x d_head
        w_head_k = w_head_k.view(klen, bsz, self.n_head, self.d_head)  # qlen x bsz x n_head x d_head
        w_head_v = w_head_v.view(klen, bsz, self.n_head, self.d_head)  # qlen x bsz x n_head x d_head

        r_head_k = r_head_k.view(rlen, self.n_head, self.d_head)  # qlen x n_head x d_head

        #### compute attention score
        rw_head_q = w_head_q + r_w_bias  # qlen x bsz x n_head x d_head
        AC = torch.einsum("ibnd,jbnd->ijbn", (rw_head_q, w_head_k))  # qlen x klen x bsz x n_head

        rr_head_q = w_head_q + r_r_bias
        BD = torch.einsum("ibnd,jnd->ijbn", (rr_head_q, r_head_k))  # qlen x klen x bsz x n_head
        BD = self._rel_shift(BD)

        # [qlen x klen x bsz x n_head]
        attn_score = AC + BD
        attn_score.mul_(self.scale)

        #### compute attention probability
        if attn_mask is not None and attn_mask.any().item():
            if attn_mask.dim() == 2:
                attn_score = attn_score.float().masked_fill(
                    attn_mask[None, :, :, None].bool(), -float("inf")).type_as(attn_score)
            elif attn_mask.dim() == 3:
                attn_score = attn_score.float().masked_fill(
                    attn_mask[:, :, :, None].bool(), -float("inf")).type_as(attn_score)

        # [qlen x klen x bsz x n_head]
        attn_prob = F.softmax(attn_score, dim=1)
        attn_prob = self.dropatt(attn_prob)

        #### compute attention vector
        attn_vec = torch.einsum("ijbn,jbnd->ibnd", (attn_prob, w_head_v))

        # [qlen x bsz x n_head x d_head]
        attn_vec = attn_vec.contiguous().view(attn_vec.size(0), attn_vec.size(1), self.n_head * self.d_head)

        ##### linear projection
        attn_out = self.o_net(attn_vec)
        attn_out = self.drop(attn_out)

        ##### residual connection + layer normalization
        output = self.layer_norm(w + attn_out)

        return output


class RelPartialLearnableDecoderLayer(nn.Module):
    def __init__(self, n_head, d_model, d_head, d_inner, dropout, **kwargs):
        super(RelPartialLearnableDecoderLayer, self).__init__()

        self.dec_attn = RelPartialLearnableMultiHeadAttn(n_head, d_model, d_head, dropout, **kwargs)
        self.pos_ff = PositionwiseFF(d_model, d_inner, dropout)

    def forward(self, dec_inp, r, r_w_bias, r_r_bias, dec_attn_mask=None, mems=None):
        output = self.dec_attn(dec_inp, r, r_w_bias, r_r_bias, attn_mask=dec_attn_mask, mems=mems)
        output = self.pos_ff(output)

        return output


class XLBlock(nn.Module):
    """MemTransformerLM trimmed to its layers: attn_type 0, pre_lnorm False, ext_len 0, num_mem_tokens 0;
    r_w_bias / r_r_bias shared by all layers (XL's untie_r False)."""

    def __init__(self, n_layer, n_head, d_model, d_head, d_inner, dropout, dropatt, mem_len, same_length=False,
                 clamp_len=-1):
        super(XLBlock, self).__init__()
        self.n_layer, self.n_head, self.d_model, self.d_head = n_layer, n_head, d_model, d_head
        self.drop = nn.Dropout(dropout)
        self.mem_len = mem_len
        self.ext_len = 0
        self.same_length = same_length
        self.clamp_len = clamp_len
        self.layers = nn.ModuleList(
            RelPartialLearnableDecoderLayer(n_head, d_model, d_head, d_inner, dropout, dropatt=dropatt)
            for _ in range(n_layer)
        )
        self.pos_emb = PositionalEmbedding(self.d_model)
        self.r_w_bias = nn.Parameter(torch.zeros(self.n_head, self.d_head))
        self.r_r_bias = nn.Parameter(torch.zeros(self.n_head, self.d_head))

    def init_mems(self, bsz):
        """n_layer + 1 empty caches, 0 x B x C (XL: 1-D empty tensors that torch.cat skips)."""
        if self.mem_len > 0:
            return [torch.empty(0, bsz, self.d_model) for _ in range(self.n_layer + 1)]
        return None

    def _update_mems(self, hids, mems, qlen, mlen):
        # does not deal with None
        if mems is None:
            return None

        # mems is not None
        assert len(hids) == len(mems), "len(hids) != len(mems)"

        # There are `mlen + qlen` steps that can be cached into mems
        # For the next step, the last `ext_len` of the `qlen` tokens
        # will be used as the extended context. Hence, we only cache
        # the tokens from `mlen + qlen - self.ext_len - self.mem_len`
        # to `mlen + qlen - self.ext_len`.
        with torch.no_grad():
            new_mems = []
            end_idx = mlen + max(0, qlen - 0 - self.ext_len)
            beg_idx = max(0, end_idx - self.mem_len)
            for i in range(len(hids)):
                cat = torch.cat([mems[i], hids[i]], dim=0)
                new_mems.append(cat[beg_idx:end_idx].detach())

        return new_mems

    def _forward(self, word_emb, mems=None):
        """word_emb: T x B x C (XL's scaled word embedding); mems: n_layer + 1 tensors L x B x C or None.
        -> (T x B x C after the final dropout, new mems: n_layer + 1 tensors of the last mem_len positions)."""
        mlen = mems[0].size(0) if mems is not None else 0

        qlen = word_emb.shape[0]
        klen = mlen + qlen
        if self.same_length:
            all_ones = word_emb.new_ones(qlen, klen)
            mask_len = klen - self.mem_len
            if mask_len > 0:
                mask_shift_len = qlen - mask_len
            else:
                mask_shift_len = qlen
            dec_attn_mask = (torch.triu(all_ones, 1 + mlen) + torch.tril(all_ones, -mask_shift_len)).byte()[
                :, :, None
            ]  # -1
        else:
            dec_attn_mask = torch.triu(word_emb.new_ones(qlen, klen), diagonal=1 + mlen).byte()[:, :, None]

        hids = []
        pos_seq = torch.arange(klen - 1, -1, -1.0, device=word_emb.device, dtype=word_emb.dtype)
        if self.clamp_len > 0:
            pos_seq.clamp_(max=self.clamp_len)
        pos_emb = self.pos_emb(pos_seq)

        core_out = self.drop(word_emb)
        pos_emb = self.drop(pos_emb)

        hids.append(core_out)
        for i, layer in enumerate(self.layers):
            mems_i = None if mems is None else mems[i]
            core_out = layer(core_out, pos_emb, self.r_w_bias, self.r_r_bias, dec_attn_mask=dec_attn_mask,
                             mems=mems_i)
            hids.append(core_out)

        core_out = self.drop(core_out)

        # (XL passes (mlen, qlen) to the (qlen, mlen) parameters; with ext_len 0 the result is the same)
        new_mems = self._update_mems(hids, mems, mlen, qlen)

        return core_out, new_mems


def xl_block_train_reference(
    block: XLBlock,
    x: torch.Tensor,  # B x N x C, the embedded input rows (memory rows included, if any), not yet dropped
    mems: Optional[List[torch.Tensor]],  # per layer B x L x C, or None
    dropout: float,
    dropatt: float,
    dropact: float,
    masked: Optional[torch.Tensor] = None,  # N x K bool, True = masked; None: XL's causal mask
    pos_seq: Optional[torch.Tensor] = None,  # P distances, descending; None: XL's K-1 .. 0
    rel_index: Optional[torch.Tensor] = None,  # N x K long, row of pos_seq for (i, j); None: XL's rel-shift
    embed_dropout_rows: Optional[slice] = None,  # rows of x that the embedding dropout covers; None: all
    output_dropout_rows: Optional[slice] = None,  # rows the final dropout covers (and returns); None: all
):
    """XL's forward in training mode, written from its equations in batch-first layout, with the dropout calls
    in XL's (and LM-RMT's) order: drop(word_emb), drop(pos_emb); per layer: softmax -> dropatt -> attention
    vector -> o_net -> drop -> LN(x + .); FFN Linear -> ReLU -> drop(dropact) -> Linear -> drop -> LN(x + .);
    final drop. Every dropout is an F.dropout on a B-first tensor (XL's own code draws them on T x B tensors,
    so its masks cannot be reproduced by a B-first model; this function can). Attention uses an explicit
    softmax and F.dropout on the B x H x N x K probabilities. Weights come from `block` (an XLBlock).

    Defaults give XL (no memory tokens): causal mask over [cache | segment], XL's pos_seq with clamp_len and
    XL's rel-shift (applied to the permuted N x K x B x H scores). For memory tokens pass the mask, the distance
    table and its index (LM-RMT's rel-shift is undefined for negative distances).

    Returns (output B x |output rows| x C after the final dropout, the final layer's output B x N x C before
    it, hids: per layer its input B x N x C)."""
    B, N, C = x.shape
    H, D = block.n_head, block.d_head
    L = mems[0].size(1) if mems is not None else 0
    K = L + N
    if masked is None:
        masked = torch.ones(N, K, dtype=torch.bool).triu(1 + L)  # XL's dec_attn_mask without same_length
    if pos_seq is None:
        pos_seq = torch.arange(K - 1, -1, -1.0)
    if block.clamp_len > 0:
        pos_seq = pos_seq.clamp(max=block.clamp_len)

    rows = embed_dropout_rows or slice(0, N)
    dropped = F.dropout(x[:, rows].contiguous(), dropout)  # B x |rows| x C
    x = torch.cat([x[:, : rows.start], dropped, x[:, rows.stop :]], dim=1)  # B x N x C
    pos_emb = F.dropout(block.pos_emb(pos_seq)[:, 0], dropout)  # P x C
    u, v = block.r_w_bias, block.r_r_bias  # H x D

    hids = []
    h = x
    for i, layer in enumerate(block.layers):
        hids.append(h)
        att, ff = layer.dec_attn, layer.pos_ff
        kv_in = torch.cat([mems[i], h], dim=1) if mems is not None else h  # B x K x C
        q = F.linear(h, att.qkv_net.weight)[..., : H * D]  # B x N x H*D (the q chunk of qkv_net)
        _, k, val = F.linear(kv_in, att.qkv_net.weight).chunk(3, dim=-1)  # B x K x H*D each
        q = q.view(B, N, H, D).transpose(1, 2)  # B x H x N x D
        k = k.reshape(B, K, H, D).transpose(1, 2)  # B x H x K x D
        val = val.reshape(B, K, H, D).transpose(1, 2)  # B x H x K x D
        r = F.linear(pos_emb, att.r_net.weight).view(-1, H, D)  # P x H x D

        ac = torch.einsum("bhnd,bhkd->bhnk", q + u[None, :, None], k)  # B x H x N x K
        bd = torch.einsum("bhnd,phd->bhnp", q + v[None, :, None], r)  # B x H x N x P
        if rel_index is None:
            # XL's rel-shift, on the layout it expects: N x P x B x H (P = K), back to B x H x N x K
            bd = RelMultiHeadAttn._rel_shift(bd.permute(2, 3, 0, 1)).permute(2, 3, 0, 1)
        else:
            bd = bd.gather(-1, rel_index.expand(B, H, N, K))  # B x H x N x K
        score = ((ac + bd) * att.scale).masked_fill(masked, float("-inf"))  # B x H x N x K
        prob = F.dropout(torch.softmax(score, dim=-1), dropatt)  # B x H x N x K
        vec = (prob @ val).transpose(1, 2).reshape(B, N, H * D)  # B x N x H*D
        h = att.layer_norm(h + F.dropout(F.linear(vec, att.o_net.weight), dropout))  # B x N x C

        lin1, lin2 = ff.CoreNet[0], ff.CoreNet[3]
        inner = F.dropout(torch.relu(F.linear(h, lin1.weight, lin1.bias)), dropact)  # B x N x d_inner
        h = ff.layer_norm(h + F.dropout(F.linear(inner, lin2.weight, lin2.bias), dropout))  # B x N x C

    rows = output_dropout_rows or slice(0, N)
    return F.dropout(h[:, rows].contiguous(), dropout), h, hids
