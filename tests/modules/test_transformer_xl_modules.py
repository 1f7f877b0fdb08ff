"""XLAdaptiveEmbedding and XLAdaptiveLogSoftmax (modules/transformer_xl.py) against Transformer-XL's own
AdaptiveEmbedding and ProjectedAdaptiveLogSoftmax, their NLL / log-prob consistency, padding, gradients of unused
bands, tying, and the model built with --embedding-impl transformer_xl.

Legend: B batch, T tokens, C model dim (XL's d_proj), E embedding dim (XL's d_embed), V vocabulary, K clusters."""

import pytest
import torch
import torch.nn.functional as F

from helpers import tiny_model
from rmt_fairseq.modules.transformer_xl import XLAdaptiveEmbedding, XLAdaptiveLogSoftmax

V, PAD = 20, 1


# ---- a port of Transformer-XL's code (LM-RMT pytorch/utils/proj_adaptive_softmax.py and mem_transformer.py, the
# same as kimiyoung/transformer-xl), on XL's parameter layout ------------------------------------------------


def _xl_logit(hidden, weight, bias, proj):  # ProjectedAdaptiveLogSoftmax._compute_logit
    if proj is None:
        return F.linear(hidden, weight, bias=bias)
    return F.linear(F.linear(hidden, proj.t().contiguous()), weight, bias=bias)


def xl_proj_adaptive_nll(hidden, target, n_token, cutoffs, div_val, out_layers, out_projs, cluster_weight,
                         cluster_bias):
    """ProjectedAdaptiveLogSoftmax.forward(hidden BT x C, target BT, keep_order=True) -> per-token NLL BT.
    out_layers: [(weight, bias)]: one for the whole vocabulary when div_val is 1 (sliced per band), else one per
    band; out_projs: per band, C x E_i or None."""
    cutoffs = cutoffs + [n_token]
    if len(cutoffs) == 1:
        logit = _xl_logit(hidden, out_layers[0][0], out_layers[0][1], out_projs[0])
        return -F.log_softmax(logit, dim=-1).gather(1, target.unsqueeze(1)).squeeze(1)
    weights, biases = [], []
    for i in range(len(cutoffs)):
        if div_val == 1:
            l_idx, r_idx = ([0] + cutoffs)[i], cutoffs[i]
            weight_i, bias_i = out_layers[0][0][l_idx:r_idx], out_layers[0][1][l_idx:r_idx]
        else:
            weight_i, bias_i = out_layers[i]
        if i == 0:
            weight_i = torch.cat([weight_i, cluster_weight], dim=0)
            bias_i = torch.cat([bias_i, cluster_bias], dim=0)
        weights.append(weight_i)
        biases.append(bias_i)
    head_logprob = F.log_softmax(_xl_logit(hidden, weights[0], biases[0], out_projs[0]), dim=1)
    nll = torch.zeros_like(target, dtype=hidden.dtype)
    cutoff_values = [0] + cutoffs
    for i in range(len(cutoff_values) - 1):
        l_idx, r_idx = cutoff_values[i], cutoff_values[i + 1]
        indices_i = ((target >= l_idx) & (target < r_idx)).nonzero().squeeze(1)
        if indices_i.numel() == 0:
            continue
        target_i = target.index_select(0, indices_i) - l_idx
        head_logprob_i = head_logprob.index_select(0, indices_i)
        if i == 0:
            logprob_i = head_logprob_i.gather(1, target_i[:, None]).squeeze(1)
        else:
            tail = F.log_softmax(_xl_logit(hidden.index_select(0, indices_i), weights[i], biases[i], out_projs[i]), 1)
            logprob_i = head_logprob_i[:, -i] + tail.gather(1, target_i[:, None]).squeeze(1)
        nll.index_copy_(0, indices_i, -logprob_i)
    return nll


def xl_adaptive_embedding(inp, n_token, d_embed, d_proj, cutoffs, div_val, emb_layers, emb_projs):
    """AdaptiveEmbedding.forward without its final `* d_proj ** 0.5` (the decoder applies the scale).
    emb_layers: weights (one for the vocabulary when div_val is 1); emb_projs: C x E_i or None."""
    if div_val == 1:
        embed = F.embedding(inp, emb_layers[0])
        return F.linear(embed, emb_projs[0]) if d_proj != d_embed else embed
    cutoffs = cutoffs + [n_token]
    ends = [0] + cutoffs
    inp_flat = inp.reshape(-1)
    emb_flat = torch.zeros(inp_flat.size(0), d_proj)
    for i in range(len(cutoffs)):
        indices_i = ((inp_flat >= ends[i]) & (inp_flat < ends[i + 1])).nonzero().squeeze(1)
        if indices_i.numel() == 0:
            continue
        emb_i = F.linear(F.embedding(inp_flat.index_select(0, indices_i) - ends[i], emb_layers[i]), emb_projs[i])
        emb_flat.index_copy_(0, indices_i, emb_i)
    return emb_flat.view(*inp.size(), d_proj)


# ---- the parameters of ours in XL's layout ------------------------------------------------------------------


def _xl_softmax_params(sm: XLAdaptiveLogSoftmax, div_val):
    out_layers = [(layer.weight, layer.bias) for layer in sm.out_layers]
    if div_val == 1:  # XL: one output layer for the whole vocabulary, sliced per band
        out_layers = [(torch.cat([w for w, _ in out_layers]), torch.cat([b for _, b in out_layers]))]
    out_projs = [getattr(p, "weight", None) for p in sm.out_projs]  # TransposedProjection C x E_i, or None
    # XL scores band i with the head's column -i (cluster_weight[K - i]); so does ours: the rows are XL's, in order
    cw, cb = (sm.cluster.weight, sm.cluster.bias) if sm.cluster is not None else (None, None)
    return out_layers, out_projs, cw, cb


def _randomize(*modules, seed=0, std=0.5):
    """Weights far from the init (projections N(0, 0.01) would make every logit ~0 and the comparison weak)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * std)


CASES = [  # (cutoffs, div_val, E, C): enwik8-like, wt103-like, and projected variants
    ([], 1, 16, 16),
    ([], 1, 16, 12),
    ([], 2, 16, 12),
    ([6, 12], 1, 16, 16),
    ([6, 12], 1, 16, 12),
    ([6, 12], 2, 16, 16),
    ([6, 12], 2, 16, 12),
    ([6], 2, 16, 16),
]
CASE_IDS = [f"cutoffs{'-'.join(map(str, c)) or 'none'}-div{d}-E{e}-C{c_}" for c, d, e, c_ in CASES]


def _targets(seed, n=48, exclude_pad=True):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, V, (n,), generator=g)
    if exclude_pad:
        t[t == PAD] = 0
    t[:3] = torch.tensor([0, 7, V - 1])  # every band of [6, 12] present
    return t


@pytest.mark.parametrize("cutoffs,div_val,E,C", CASES, ids=CASE_IDS)
def test_log_softmax_equals_transformer_xl(cutoffs, div_val, E, C):
    """Per-token NLL equals XL's ProjectedAdaptiveLogSoftmax.forward on the same weights (to 1e-5)."""
    sm = XLAdaptiveLogSoftmax(V, E, C, cutoffs, div_val)
    _randomize(sm)
    assert all((p is None) == (div_val == 1 and E == C) for p in _xl_softmax_params(sm, div_val)[1])
    hidden = torch.randn(48, C, generator=torch.Generator().manual_seed(1))
    target = _targets(2)
    ref = xl_proj_adaptive_nll(hidden, target, V, list(cutoffs), div_val, *_xl_softmax_params(sm, div_val))
    ours = torch.stack([sm.nll(hidden[i : i + 1], target[i : i + 1], PAD) for i in range(len(target))])
    assert torch.allclose(ours, ref, atol=1e-5, rtol=0)
    assert torch.allclose(sm.nll(hidden[None], target[None], PAD), ref.sum(), atol=1e-4, rtol=0)  # B x T input
    lp = sm.get_log_prob(hidden[None], None)[0]  # 1 x BT x V -> BT x V
    assert torch.allclose(-lp.gather(1, target[:, None]).squeeze(1), ref, atol=1e-5, rtol=0)


def test_cluster_order_matters_when_there_are_two_clusters_or_more():
    """The comparison above is not vacuous about cluster order: the cluster rows in the other order give another NLL
    (ours keeps XL's order, so an XL / LM-RMT checkpoint's cluster_weight loads row for row)."""
    sm = XLAdaptiveLogSoftmax(V, 16, 16, [6, 12], 1)
    _randomize(sm)
    hidden, target = torch.randn(48, 16, generator=torch.Generator().manual_seed(1)), _targets(2)
    out_layers, out_projs, cw, cb = _xl_softmax_params(sm, 1)
    ref = xl_proj_adaptive_nll(hidden, target, V, [6, 12], 1, out_layers, out_projs, cw, cb)
    unflipped = xl_proj_adaptive_nll(hidden, target, V, [6, 12], 1, out_layers, out_projs, cw.flip(0), cb.flip(0))
    assert not torch.allclose(ref, unflipped, atol=1e-3)


@pytest.mark.parametrize("cutoffs,div_val,E,C", CASES, ids=CASE_IDS)
def test_adaptive_embedding_equals_transformer_xl(cutoffs, div_val, E, C):
    emb = XLAdaptiveEmbedding(V, E, C, cutoffs, div_val, padding_idx=PAD)
    _randomize(emb)
    if div_val == 1 and E != C and cutoffs:
        # XL has one projection for the whole vocabulary here; ours one per band: set them equal to compare
        with torch.no_grad():
            for p in emb.emb_projs[1:]:
                p.weight.copy_(emb.emb_projs[0].weight)
    tokens = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(3))
    tokens[0, :3] = torch.tensor([0, 7, V - 1])
    weights = [layer.weight for layer in emb.emb_layers]
    if div_val == 1:
        weights = [torch.cat(weights)]
    projs = [p.weight if isinstance(p, torch.nn.Linear) else None for p in emb.emb_projs]
    ref = xl_adaptive_embedding(tokens, V, E, C, list(cutoffs), div_val, weights, projs)
    out = emb(tokens)
    assert out.shape == (3, 7, C)
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("cutoffs,div_val,E,C", CASES, ids=CASE_IDS)
def test_nll_is_minus_the_summed_log_prob_and_probabilities_sum_to_one(cutoffs, div_val, E, C):
    sm = XLAdaptiveLogSoftmax(V, E, C, cutoffs, div_val)
    _randomize(sm, seed=5)
    hidden = torch.randn(2, 24, C, generator=torch.Generator().manual_seed(6))  # B x T x C
    target = _targets(7).view(2, 24)
    lp = sm.get_log_prob(hidden, None)  # B x T x V
    assert lp.shape == (2, 24, V) and lp.dtype == torch.float32
    assert torch.allclose(lp.exp().sum(-1), torch.ones(2, 24), atol=1e-5)
    assert torch.allclose(sm.nll(hidden, target, PAD), -lp.gather(-1, target[..., None]).sum(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("cutoffs", [[], [6, 12]])
def test_pad_targets_are_not_scored(cutoffs):
    """A pad target adds nothing (and its hidden state gets no gradient); a tail word whose index within its band
    equals pad (cutoff + pad) is scored like any other word."""
    sm = XLAdaptiveLogSoftmax(V, 16, 16, cutoffs, 1)
    _randomize(sm, seed=8)
    hidden = torch.randn(1, 12, 16, generator=torch.Generator().manual_seed(9), requires_grad=True)
    target = torch.tensor([[2, PAD, 5, PAD, 6 + PAD, 12 + PAD, 3, 8, PAD, 19, 0, 13]])
    scored = target != PAD
    lp = sm.get_log_prob(hidden, None)
    expected = -lp.gather(-1, target[..., None]).squeeze(-1)[scored].sum()
    loss = sm.nll(hidden, target, PAD)
    assert torch.allclose(loss, expected, atol=1e-5)
    assert loss < -lp.gather(-1, target[..., None]).sum() - 1e-3  # the pad positions would have added to it
    (grad,) = torch.autograd.grad(loss, hidden)
    assert (grad[~scored] == 0).all() and (grad[scored].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("div_val,C", [(1, 16), (2, 16), (2, 12)])
def test_every_band_gets_a_gradient_when_no_target_falls_in_it(div_val, C):
    """Data-parallel safety: with every token and target in band 0, every band's parameters (embedding and softmax,
    projections included) still take part in backward: a gradient tensor, zero for the unused bands."""
    emb = XLAdaptiveEmbedding(V, 16, C, [6, 12], div_val, padding_idx=PAD)
    sm = XLAdaptiveLogSoftmax(V, 16, C, [6, 12], div_val)
    _randomize(emb, sm, seed=10)
    tokens = torch.tensor([[0, 2, 3, 4, 5, 2]])  # band 0 only
    target = torch.tensor([[2, 3, 4, 5, 0, 3]])
    sm.nll(emb(tokens), target, PAD).backward()
    for m in (emb, sm):
        for name, p in m.named_parameters():
            assert p.grad is not None, name
    for i in (1, 2):
        for p in [*emb.emb_layers[i].parameters(), *emb.emb_projs[i].parameters(),
                  *sm.out_layers[i].parameters(), *sm.out_projs[i].parameters()]:
            assert (p.grad == 0).all()
    assert sm.out_layers[0].weight.grad.abs().sum() > 0 and emb.emb_layers[0].weight.grad.abs().sum() > 0
    # the cluster logits are in the head's normaliser, so they get a gradient although no target is in a tail
    assert sm.cluster.weight.grad.abs().sum() > 0


def test_tied_weights_and_projections():
    """XL's tie_weight: out_layers[i].weight is emb_layers[i].weight (biases stay the softmax's own); tie_projs
    [False, True, True] (XL's for WT103): the projection of every band but the first is the embedding's."""
    emb = XLAdaptiveEmbedding(V, 16, 12, [6, 12], 2, padding_idx=PAD)
    sm = XLAdaptiveLogSoftmax(V, 16, 12, [6, 12], 2, tied_embedding=emb, tie_projs=[False, True, True])
    for i in range(3):
        assert sm.out_layers[i].weight is emb.emb_layers[i].weight
        assert sm.out_layers[i].weight.shape == (sm.bands[i][1] - sm.bands[i][0], 16 // 2**i)
    assert sm.out_projs[0].weight is not emb.emb_projs[0].weight
    for i in (1, 2):
        assert sm.out_projs[i].weight is emb.emb_projs[i].weight  # C x E_i, used transposed (XL's proj.t())
    shared = {id(p) for p in emb.parameters()} & {id(p) for p in sm.parameters()}
    assert len(shared) == 3 + 2
    untied = XLAdaptiveLogSoftmax(V, 16, 12, [6, 12], 2, tied_embedding=emb, tie_projs=[False, False, False])
    assert all(untied.out_projs[i].weight is not emb.emb_projs[i].weight for i in range(3))
    assert all(untied.out_layers[i].weight is emb.emb_layers[i].weight for i in range(3))


@pytest.mark.parametrize("tie_proj", [True, False])
def test_model_ties_as_transformer_xl(tie_proj):
    model = tiny_model(embedding_impl="transformer_xl", adaptive_softmax_cutoff="10,20", div_val=2,
                       tie_adaptive_weights=True, tie_adaptive_proj=tie_proj)
    sm, emb = model.decoder.adaptive_softmax, model.decoder.embed_tokens
    assert isinstance(sm, XLAdaptiveLogSoftmax) and isinstance(emb, XLAdaptiveEmbedding)
    assert all(sm.out_layers[i].weight is emb.emb_layers[i].weight for i in range(3))
    assert sm.out_projs[0].weight is not emb.emb_projs[0].weight
    assert all((sm.out_projs[i].weight is emb.emb_projs[i].weight) == tie_proj for i in (1, 2))


def test_model_bands_get_gradients_when_the_batch_uses_band_0_only():
    model = tiny_model(vocab=40, embedding_impl="transformer_xl", adaptive_softmax_cutoff="10,20", div_val=2,
                       tie_adaptive_weights=True, tie_adaptive_proj=True)
    x = torch.randint(4, 10, (2, 8), generator=torch.Generator().manual_seed(12))  # ids < 10: band 0
    losses, _ = model(x, target=x.roll(-1, 1))
    losses.sum().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    for i in (1, 2):
        assert (model.decoder.embed_tokens.emb_layers[i].weight.grad == 0).all()
        assert (model.decoder.adaptive_softmax.out_layers[i].bias.grad == 0).all()


def test_model_with_transformer_xl_embedding_trains_and_scores_consistently():
    """--embedding-impl transformer_xl in the model: the training loss (forward with a target) equals -sum log p
    from the scoring path (forward without a target -> get_normalized_probs), and one step lowers it with every
    parameter (tied ones included) receiving a gradient."""
    model = tiny_model(vocab=40, embedding_impl="transformer_xl", adaptive_softmax_cutoff="10,20",
                       tie_adaptive_weights=True)
    dec = model.decoder
    assert isinstance(dec.adaptive_softmax, XLAdaptiveLogSoftmax) and dec.output_projection is None
    assert dec.adaptive_softmax.out_layers[1].weight is dec.embed_tokens.emb_layers[1].weight
    g = torch.Generator().manual_seed(11)
    x = torch.randint(4, 44, (2, 16), generator=g)  # 2 segments of 8 (tiny_model: tokens_per_sample 8)
    y = torch.randint(4, 44, (2, 16), generator=g)
    y[0, :3] = torch.tensor([5, 15, 30])  # every band
    model.eval()
    with torch.no_grad():
        losses, extra = model(x, target=y)
        features, net_extra = model(x)
        lp = dec.get_normalized_probs((features, net_extra), log_probs=True)  # B x 16 x V
    assert losses.shape == (2,) and extra["ntokens"] == y.numel()
    assert torch.allclose(lp.exp().sum(-1), torch.ones(2, 16), atol=1e-5)
    assert torch.allclose(losses.sum(), -lp.gather(-1, y[..., None]).sum(), atol=1e-4, rtol=0)
    assert torch.allclose(lp, dec.token_log_probs(features), atol=1e-6)

    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt.zero_grad()
    losses, _ = model(x, target=y)
    before = losses.sum()
    before.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    opt.step()
    with torch.no_grad():
        after = model(x, target=y)[0].sum()
    assert after < before.detach() - 1e-3


@pytest.mark.parametrize("cutoff", [None, "10,20"])
def test_checkpoint_vocabulary_is_read_from_xl_embeddings(cutoff):
    """The checks that name a checkpoint trained on another vocabulary read its size from XL's embedding too."""
    from rmt_fairseq.errors import RMTConfigError
    from rmt_fairseq.models.trained_with import check_vocabulary, vocabulary_size

    model = tiny_model(vocab=40, embedding_impl="transformer_xl", adaptive_softmax_cutoff=cutoff, div_val=2,
                       share_decoder_input_output_embed=True)
    n = len(model.decoder.dictionary)
    assert vocabulary_size(model.state_dict()) == n
    check_vocabulary(model.state_dict(), n, "the checkpoint", "dict.txt")
    with pytest.raises(RMTConfigError, match=f"vocabulary of {n} types, but dict.txt has {n + 8}"):
        check_vocabulary(model.state_dict(), n + 8, "the checkpoint", "dict.txt")


@pytest.mark.parametrize("cutoffs", [(), (6,), (6, 12)])
def test_fairseq_adaptive_loss_interface_gives_the_same_nll(cutoffs):
    """forward(hidden, target) is fairseq's AdaptiveSoftmax interface (--criterion adaptive_loss under
    --task language_modeling): the summed cross entropies of its lists equal nll()."""
    sm = XLAdaptiveLogSoftmax(V, 16, 16, list(cutoffs), 1)
    _randomize(sm, seed=11)
    hidden = torch.randn(2, 24, 16, generator=torch.Generator().manual_seed(12))
    target = _targets(13).view(2, 24)
    target[0, :2] = torch.tensor([V - 1, 0])
    logits, targets = sm(hidden, target)
    assert len(logits) == len(targets) == len(cutoffs) + 1
    loss = sum(F.cross_entropy(lg.float(), tg, reduction="sum") for lg, tg in zip(logits, targets) if tg is not None)
    assert torch.allclose(loss, sm.nll(hidden, target, padding_idx=-100), atol=1e-4)
