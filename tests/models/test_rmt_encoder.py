"""The rmt_encoder model (RoBERTa-style encoder RMT for long-document classification), on the real model:
attention mask by gradients, recurrence through memory, the no-memory model is RoBERTa, --roberta-path,
truncated BPTT through the segment loop, the loss layout and the logits of forward."""

import argparse
import types

import pytest
import torch
import torch.nn.functional as F
from fairseq.data import Dictionary
from fairseq.models.roberta import RobertaModel
from fairseq.models.roberta.model import base_architecture as roberta_base_architecture

import user_dir  # noqa: F401  (registrations)
from helpers import armt_with_values, diagonal_calls
from rmt_fairseq.data.documents import IGNORE
from rmt_fairseq.errors import RMTConfigError
from rmt_fairseq.models.rmt_encoder import RMTEncoderConfig, RMTEncoderModel, validate_config
from rmt_fairseq.modules.recurrence import RecurrentState, run_segments

WORDS = 30  # ordinary symbols w0..w29
T, M, C = 8, 3, 32  # segment length, memory tokens, model dim
SIZES = dict(encoder_layers=2, encoder_embed_dim=C, encoder_ffn_embed_dim=64, encoder_attention_heads=2,
             max_positions=64, dropout=0.0, attention_dropout=0.0)


def make_dictionary() -> Dictionary:
    d = Dictionary()
    for i in range(WORDS):
        d.add_symbol(f"w{i}")
    d.add_symbol("<mask>")  # as the task does (RoBERTa's vocabulary)
    return d


DICT = make_dictionary()
FIRST = DICT.nspecial  # first ordinary id
PAD, BOS, EOS = DICT.pad(), DICT.bos(), DICT.eos()


def make_task(dictionary=DICT, tokens_per_sample=T, num_classes=3):
    """The three things build_model reads from the task."""
    return types.SimpleNamespace(source_dictionary=dictionary, num_classes=num_classes,
                                 cfg=types.SimpleNamespace(tokens_per_sample=tokens_per_sample))


def make_cfg(**overrides) -> RMTEncoderConfig:
    kw = dict(SIZES, mem_tokens=M, tokens_per_sample=T)
    kw.update(overrides)
    return RMTEncoderConfig(**kw)


def build(seed=0, task=None, **overrides) -> RMTEncoderModel:
    torch.manual_seed(seed)
    cfg = make_cfg(**overrides)
    return RMTEncoderModel.build_model(cfg, task or make_task(tokens_per_sample=cfg.tokens_per_sample))


def words(shape, gen, low=FIRST, high=FIRST + WORDS):
    return torch.randint(low, high, shape, generator=gen)


# ---- the attention mask, by gradients of one segment ---------------------------------------------------------


def forward_with_embedding_leaf(enc, tokens, memory):
    """forward_segment, with the token-embedding lookup (B x N x C) made a leaf we can differentiate by."""
    got = {}

    def hook(module, inputs, output):
        got["emb"] = output.detach().requires_grad_()
        return got["emb"]

    h = enc.sentence_encoder.embed_tokens.register_forward_hook(hook)
    try:
        out = enc.forward_segment(tokens, memory)
    finally:
        h.remove()
    return out, got["emb"]


def test_encoder_mask_by_gradients():
    enc = build().double().eval().encoder
    gen = torch.Generator().manual_seed(1)
    B, n_real = 2, [T, 5]  # row 1 ends after 5 tokens: pads at segment positions 5..7
    tokens = words((B, T), gen)
    tokens[1, n_real[1]:] = PAD
    memory = torch.randn(B, M, C, dtype=torch.float64, generator=gen).requires_grad_()
    out, emb = forward_with_embedding_leaf(enc, tokens, memory)
    N = 1 + M + T + 1
    assert out.hidden.shape == (B, N, C) and out.memory.shape == (B, M, C)
    assert torch.equal(out.memory, out.hidden[:, 1:1 + M])  # the memory written is the memory rows' output
    w = torch.randn(C, dtype=torch.float64, generator=gen)  # a random read-out (LayerNorm outputs sum to a const)

    for b in range(B):
        seg = [1 + M + t for t in range(n_real[b])]  # real segment positions
        pads = [1 + M + t for t in range(n_real[b], T)]
        rows = [0, *range(1, 1 + M), *seg, N - 1]  # <s>, memory, real tokens, </s>: every non-pad position
        for i in rows:
            g_emb, g_mem = torch.autograd.grad((out.hidden[b, i] * w).sum(), [emb, memory], retain_graph=True)
            for j in range(M):  # depends on every input memory vector
                assert g_mem[b, j].abs().sum() > 0, (b, i, j)
            for p in [0, *seg, N - 1]:  # ... on <s>, every segment token and </s>
                assert g_emb[b, p].abs().sum() > 0, (b, i, p)
            for p in pads:  # pad positions influence nothing
                assert g_emb[b, p].abs().sum() == 0, (b, i, p)
            other = 1 - b  # documents of a batch are independent
            assert g_emb[other].abs().sum() == 0 and g_mem[other].abs().sum() == 0, (b, i)
        for j in range(M):  # the memory written depends on every real segment token
            (g_emb,) = torch.autograd.grad((out.memory[b, j] * w).sum(), [emb], retain_graph=True)
            for p in seg:
                assert g_emb[b, p].abs().sum() > 0, (b, j, p)


def test_appending_pads_changes_nothing_real():
    enc = build().double().eval().encoder
    gen = torch.Generator().manual_seed(2)
    n = 5
    tokens = words((2, n), gen)
    padded = torch.cat([tokens, torch.full((2, T - n), PAD)], dim=1)
    memory = torch.randn(2, M, C, dtype=torch.float64, generator=gen)
    a, b = enc.forward_segment(tokens, memory), enc.forward_segment(padded, memory)
    real = 1 + M + n  # <s>, memory and the real tokens; </s> is last in both
    assert torch.allclose(a.hidden[:, :real], b.hidden[:, :real], rtol=0, atol=1e-10)
    assert torch.allclose(a.hidden[:, -1], b.hidden[:, -1], rtol=0, atol=1e-10)
    assert torch.allclose(a.memory, b.memory, rtol=0, atol=1e-10)
    # and the padded positions' token id really is the pad (so this is the pad path, not some other token)
    assert bool((padded[:, n:] == enc.pad).all())


# ---- recurrence ------------------------------------------------------------------------------------------


def segment_logits(enc, x):
    got = {}
    with torch.no_grad():
        run_segments(enc, x, None, RecurrentState(), seg_len=T,
                     on_segment=lambda s, out: got.__setitem__(s, enc.classify(out.hidden)))
    return got


@pytest.mark.parametrize("mem_tokens", [M, 0])
def test_segment_2_sees_segment_1_only_through_memory(mem_tokens):
    # float64: at initialisation (weights std 0.02) one token of segment 1 moves segment 2's logits by ~1e-6
    enc = build(mem_tokens=mem_tokens).double().eval().encoder
    gen = torch.Generator().manual_seed(3)
    x = words((2, 2 * T), gen)
    x2 = x.clone()
    x2[:, 2] = (x2[:, 2] - FIRST + 1) % WORDS + FIRST  # change one token of segment 1
    a, b = segment_logits(enc, x), segment_logits(enc, x2)
    assert sorted(a) == [0, 1]
    assert (a[0] - b[0]).abs().amax(dim=1).min() > 1e-9  # segment 1's own logits change (sanity)
    changed = (a[1] - b[1]).abs().amax(dim=1)  # per document
    if mem_tokens:
        assert changed.min() > 1e-9  # float64 rounding is ~1e-16 of logits ~0.3
    else:
        assert torch.equal(a[1], b[1])


# ---- no memory: the backbone is RoBERTa's, unchanged -----------------------------------------------------------


def test_zero_memory_tokens_is_the_roberta_encoder():
    enc = build(mem_tokens=0).eval().encoder
    gen = torch.Generator().manual_seed(4)
    tokens = words((2, T), gen)
    src = torch.cat([torch.full((2, 1), BOS), tokens, torch.full((2, 1), EOS)], dim=1)
    with torch.no_grad():
        ours = enc.forward_segment(tokens, None)
        ref = enc.sentence_encoder(src)["encoder_out"][0].transpose(0, 1)
    assert ours.memory is None
    assert torch.allclose(ours.hidden, ref, rtol=0, atol=1e-6)
    # a short document: pads before our </s> give what RoBERTa's own right-padded [<s> x </s> pad ...] gives
    n = 5
    short = tokens.clone()
    short[:, n:] = PAD
    src = torch.cat([torch.full((2, 1), BOS), tokens[:, :n], torch.full((2, 1), EOS), torch.full((2, T - n), PAD)],
                    dim=1)
    with torch.no_grad():
        ours = enc.forward_segment(short, None).hidden
        ref = enc.sentence_encoder(src)["encoder_out"][0].transpose(0, 1)
    assert torch.allclose(ours[:, : 1 + n], ref[:, : 1 + n], rtol=0, atol=1e-6)
    assert torch.allclose(ours[:, -1], ref[:, 1 + n], rtol=0, atol=1e-6)  # </s>


# ---- --roberta-path -------------------------------------------------------------------------------------------


def make_roberta(seed=123, dictionary=DICT, **overrides):
    """A real fairseq RoBERTa (masked-LM model, LM head included) with tiny sizes."""
    args = argparse.Namespace(**dict(SIZES, **overrides))
    roberta_base_architecture(args)
    task = types.SimpleNamespace(source_dictionary=dictionary, target_dictionary=dictionary, max_positions=lambda: 64)
    torch.manual_seed(seed)
    return RobertaModel.build_model(args, task), args


def save_roberta(tmp_path, roberta, args, name="model.pt"):
    path = tmp_path / name
    torch.save({"model": roberta.state_dict(), "args": args}, path)
    return str(path)


@pytest.mark.parametrize("mem_tokens,prenorm", [(0, False), (M, False), (0, True)])
def test_roberta_path_loads_every_encoder_tensor(tmp_path, mem_tokens, prenorm):
    roberta, args = make_roberta(encoder_normalize_before=prenorm)
    path = save_roberta(tmp_path, roberta, args)
    ref = roberta.encoder.sentence_encoder.state_dict()
    fresh = build(mem_tokens=mem_tokens, encoder_normalize_before=prenorm).encoder.sentence_encoder.state_dict()
    assert not torch.equal(fresh["layers.0.fc1.weight"], ref["layers.0.fc1.weight"])  # would start different
    model = build(mem_tokens=mem_tokens, encoder_normalize_before=prenorm, roberta_path=path)
    own = model.encoder.sentence_encoder.state_dict()
    assert sorted(own) == sorted(ref)
    for k in ref:
        assert torch.equal(own[k], ref[k]), k
    if mem_tokens == 0:  # same weights, same features as RoBERTa's own forward
        roberta.eval()
        model.eval()
        gen = torch.Generator().manual_seed(5)
        tokens = words((2, T), gen)
        src = torch.cat([torch.full((2, 1), BOS), tokens, torch.full((2, 1), EOS)], dim=1)
        with torch.no_grad():
            ours = model.encoder.forward_segment(tokens, None).hidden
            theirs, _ = roberta.encoder.extract_features(src)
        assert torch.allclose(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("override,tensor,flag", [
    (dict(encoder_embed_dim=48), "embed_tokens.weight", "--encoder-embed-dim"),
    (dict(encoder_ffn_embed_dim=96), "layers.0.fc1.weight", "--encoder-ffn-embed-dim"),
    (dict(max_positions=80), "embed_positions.weight", "--max-positions"),
    (dict(dictionary=Dictionary()), "embed_tokens.weight", "dict.txt"),  # a vocabulary of another size
])
def test_roberta_path_with_other_sizes_names_tensor_and_flag(tmp_path, override, tensor, flag):
    roberta, args = make_roberta(**override)
    path = save_roberta(tmp_path, roberta, args)
    with pytest.raises(RMTConfigError) as e:
        build(roberta_path=path)
    msg = str(e.value)
    assert tensor in msg and flag in msg and path in msg, msg


@pytest.mark.parametrize("content", ["garbage", "no_model_key"])
def test_roberta_path_not_a_checkpoint(tmp_path, content):
    path = tmp_path / "model.pt"
    if content == "garbage":
        path.write_bytes(b"this is not a checkpoint\n")
    else:
        torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(RMTConfigError, match="--roberta-path"):
        build(roberta_path=str(path))


def test_roberta_path_missing_file(tmp_path):
    with pytest.raises(RMTConfigError, match="--roberta-path"):
        build(roberta_path=str(tmp_path / "nope.pt"))


# ---- truncated BPTT through the segment loop ---------------------------------------------------------------

R, S = 6, 3  # token ids per segment (disjoint ranges), segments per document


def three_segment_documents(gen, B=2):
    """Segment j uses ids FIRST + j*R .. FIRST + (j+1)*R - 1 only; the label sits at the last segment."""
    x = torch.cat([words((B, T), gen, FIRST + j * R, FIRST + (j + 1) * R) for j in range(S)], dim=1)
    target = torch.full((B, S * T), IGNORE)
    target[:, (S - 1) * T] = torch.tensor([1, 2])[:B]
    return x, target


def document_loss(enc, x, target, **kw):
    out = run_segments(enc, x, target, RecurrentState(), seg_len=T, **kw)
    assert len(out.losses) == S and out.ntokens == x.size(0)  # one scored label per document
    return torch.stack(out.losses).sum()


@pytest.mark.parametrize("K,want", [
    (None, [True, True, True]),  # default: the label's gradient reaches the first segment
    (0, [False, False, True]),
    (1, [False, False, True]),  # blocks {1, 2}, {3}: the last segment starts a block
    (2, [True, True, True]),
])
def test_bptt_truncation_reaches_back_to_the_block_start(K, want):
    model = build().train()
    enc = model.encoder
    x, target = three_segment_documents(torch.Generator().manual_seed(6))
    model.zero_grad()
    document_loss(enc, x, target, bptt_unroll=K).backward()
    g = enc.sentence_encoder.embed_tokens.weight.grad
    got = [bool(g[FIRST + j * R: FIRST + (j + 1) * R].abs().sum() > 0) for j in range(S)]
    assert got == want
    if not want[0]:  # exactly zero, not small
        assert torch.count_nonzero(g[FIRST: FIRST + R]) == 0


@pytest.mark.parametrize("K", [None, 0])
def test_checkpoint_segments_same_loss_and_gradients(K):
    x, target = three_segment_documents(torch.Generator().manual_seed(7))
    results = []
    for ckpt in (False, True):
        model = build(seed=8).train()
        loss = document_loss(model.encoder, x, target, bptt_unroll=K, checkpoint_segments=ckpt)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (l0, g0), (l1, g1) = results
    assert torch.allclose(l0, l1, rtol=0, atol=1e-6)
    assert sorted(g0) == sorted(g1)
    assert "encoder.memory.weight" in g0 and "encoder.classification_head.out_proj.weight" in g0
    for n in g0:
        assert torch.allclose(g0[n], g1[n], rtol=1e-5, atol=1e-7), n


# ---- the loss layout ----------------------------------------------------------------------------------------


def test_segment_loss_scores_only_labelled_rows():
    enc = build().eval().encoder
    gen = torch.Generator().manual_seed(9)
    hidden = torch.randn(4, 1 + M + T + 1, C, generator=gen).requires_grad_()
    target = torch.full((4, T), IGNORE)
    scored = torch.tensor([0, 2])
    target[scored, 0] = torch.tensor([2, 1])
    loss = enc.segment_loss(hidden, target)
    ref = F.cross_entropy(enc.classify(hidden[scored]), target[scored, 0], reduction="sum")
    assert torch.allclose(loss, ref, rtol=0, atol=1e-6)
    (g,) = torch.autograd.grad(loss, [hidden])
    assert g[[1, 3]].abs().sum() == 0 and g[0].abs().sum() > 0 and g[2].abs().sum() > 0
    assert enc.segment_loss(hidden, torch.full((4, T), IGNORE)).item() == 0.0  # a segment that ends no document


# ---- forward: logits of each document's last segment ----------------------------------------------------------


@pytest.mark.parametrize("n_first", [5, T])  # the first document ends inside / exactly at the end of segment 1
def test_forward_returns_each_documents_last_segment_logits(n_first):
    model = build().eval()
    gen = torch.Generator().manual_seed(10)
    first, second = words((n_first,), gen), words((T + 5,), gen)
    batch = torch.full((2, 2 * T), PAD)
    batch[0, :n_first], batch[1, : T + 5] = first, second
    alone = torch.full((1, T), PAD)
    alone[0, :n_first] = first
    with torch.no_grad():
        logits = model(batch, segment_len=T)
        logits_alone = model(alone, segment_len=T)
        second_alone = model(batch[1:], segment_len=T)
    per_segment = segment_logits(model.encoder, batch)
    assert logits.shape == (2, 3)
    assert torch.allclose(logits[0], logits_alone[0], rtol=0, atol=1e-6)
    assert torch.allclose(logits[0], per_segment[0][0], rtol=0, atol=1e-6)
    assert not torch.allclose(logits[0], per_segment[1][0], rtol=0, atol=1e-4)  # not its (empty) segment 2
    assert torch.allclose(logits[1], per_segment[1][1], rtol=0, atol=1e-6)
    assert torch.allclose(logits[1], second_alone[0], rtol=0, atol=1e-6)


# ---- validate_config ------------------------------------------------------------------------------------------


def test_segment_must_fit_max_positions():
    cfg = make_cfg(max_positions=T + M + 1)  # one position short
    with pytest.raises(RMTConfigError) as e:
        validate_config(cfg, make_task())
    assert "--tokens-per-sample" in str(e.value) and "--max-positions" in str(e.value)
    # exactly enough positions: accepted, and a full segment runs
    model = build(max_positions=T + M + 2).eval()
    with torch.no_grad():
        out = model.encoder.forward_segment(words((1, T), torch.Generator().manual_seed(11)), None)
    assert out.hidden.shape == (1, T + M + 2, C)


# ---- ARMT on the encoder (--associative-memory) ------------------------------------------------------------------


def test_armt_encoder_with_zero_write_projection_is_the_encoder_with_fresh_memory_every_segment():
    armt = build(seed=0, associative_memory=True, d_mem=4).eval()
    plain = build(seed=1).eval()
    plain.load_state_dict({k: v for k, v in armt.state_dict().items() if "assoc_layers" not in k}, strict=True)
    gen = torch.Generator().manual_seed(0)
    x = words((2, 3 * T), gen)
    state = RecurrentState()
    with torch.no_grad():
        ours = run_segments(armt.encoder, x, None, state, seg_len=T, return_hidden=True).hidden
        ref = [plain.encoder.forward_segment(seg, None).hidden for seg in x.split(T, dim=1)]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert len(state.assoc) == 2 * 2 and all(float(A.abs().max()) == 0 for A in state.assoc[0::2])


def test_armt_encoder_carries_the_associative_state_with_gradient():
    model = build(seed=0, associative_memory=True, d_mem=4)
    armt_with_values(model)
    gen = torch.Generator().manual_seed(1)
    segs = [words((2, T), gen) for _ in range(2)]
    first, leaf0 = forward_with_embedding_leaf(model.encoder, segs[0], None)
    second = model.encoder.forward_segment(segs[1], None, assoc=first.assoc)
    probe = torch.randn(second.hidden[:, 0].shape, generator=gen)  # not .sum(): a layer norm's rows sum to a constant
    g = torch.autograd.grad((second.hidden[:, 0] * probe).sum(), leaf0)[0]
    assert g.abs().sum() > 0  # segment 2's <s> reaches segment 1's tokens through the associative memory only
    assert second.memory is None and len(second.assoc) == 2 * 2


def test_armt_encoder_presets_and_bad_flags():
    cfg = argparse.Namespace()
    from fairseq.models import ARCH_CONFIG_REGISTRY

    ARCH_CONFIG_REGISTRY["armt_encoder_tiny"](cfg)
    assert (cfg.associative_memory, cfg.d_mem, cfg.mem_tokens, cfg.encoder_layers) == (True, 16, 4, 2)
    assert cfg.inference_schedule == "diagonal"
    with pytest.raises(RMTConfigError, match="--mem-tokens must be > 0, got 0"):
        build(associative_memory=True, mem_tokens=0)


# ---- the diagonal schedule on the encoder (--inference-schedule diagonal) ----------------------------------------


def _documents_with_padding(gen, B=3, S=5):
    """B documents of S segments; the second ends inside segment 3 (pad after it, as the task pads), the third
    inside the last: both the key padding mask and segments without any real token are exercised."""
    x = words((B, S * T), gen)
    x[1, 2 * T + 3 :] = PAD
    x[2, S * T - 5 :] = PAD
    return x


@pytest.mark.parametrize("kind,prenorm", [("armt", False), ("armt", True), ("none", False)])
def test_encoder_diagonal_schedule_equals_sequential(kind, prenorm):
    """Hidden states of every segment, the final associative state and the classifier's logits: diagonal ==
    sequential to 1e-10 in float64 (post-norm RoBERTa layers and pre-norm ones, ARMT and no memory)."""
    over = dict(associative_memory=True, d_mem=4) if kind == "armt" else dict(mem_tokens=0)
    model = build(seed=0, encoder_normalize_before=prenorm, **over).double().eval()
    if kind == "armt":
        armt_with_values(model)
    enc = model.encoder
    assert enc.diagonal_ok
    x = _documents_with_padding(torch.Generator().manual_seed(3))
    runs = {}
    with torch.no_grad():
        for schedule in ("sequential", "diagonal"):
            state = RecurrentState()
            hidden = run_segments(enc, x, None, state, seg_len=T, return_hidden=True, schedule=schedule).hidden
            runs[schedule] = (hidden, state)
    (h_seq, st_seq), (h_diag, st_diag) = runs["sequential"], runs["diagonal"]
    assert len(h_seq) == len(h_diag) == 5
    for a, b in zip(h_seq, h_diag):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10)
    assert st_diag.segments_seen == st_seq.segments_seen == 5
    if kind == "armt":
        assert len(st_diag.assoc) == len(st_seq.assoc) == 4 and float(st_seq.assoc[0].abs().max()) > 0
        for a, b in zip(st_seq.assoc, st_diag.assoc):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-10)
    enc.inference_schedule = "sequential"
    with torch.no_grad(), diagonal_calls(enc) as runs:  # inference (fairseq validates under no_grad)
        want = model(x, segment_len=T)
        assert not runs
        enc.inference_schedule = "diagonal"
        got = model(x, segment_len=T)  # the model's forward, with the configured schedule
        assert runs  # the diagonal path ran
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_encoder_diagonal_schedule_in_fp32_and_continuing_a_state():
    """fp32 within 1e-5 (bitwise on this machine: the layer reads and writes are the sequential calls), including
    calls that continue the state of an earlier call (chunked streaming, as rmt-extrapolate-classify does)."""
    model = armt_with_values(build(seed=0, associative_memory=True, d_mem=4)).eval()
    enc = model.encoder
    x = _documents_with_padding(torch.Generator().manual_seed(4), S=6)
    outs = {}
    with torch.no_grad():
        for schedule in ("sequential", "diagonal"):
            state, hidden = RecurrentState(), []
            for chunk in x.split(3 * T, dim=1):
                hidden += run_segments(enc, chunk, None, state, seg_len=T, return_hidden=True,
                                       schedule=schedule).hidden
            outs[schedule] = torch.stack(hidden)
    torch.testing.assert_close(outs["diagonal"], outs["sequential"], rtol=0, atol=1e-5)


def test_rmt_encoder_token_memory_stays_sequential():
    model = build(seed=0).eval()  # RMT: the last layer's memory output is the next segment's input
    enc = model.encoder
    assert not enc.diagonal_ok
    x = _documents_with_padding(torch.Generator().manual_seed(5))
    with torch.no_grad(), diagonal_calls(enc) as runs:
        seq = run_segments(enc, x, None, RecurrentState(), seg_len=T, return_hidden=True).hidden
        diag = run_segments(enc, x, None, RecurrentState(), seg_len=T, return_hidden=True, schedule="diagonal").hidden
    assert all(torch.equal(a, b) for a, b in zip(seq, diag)) and not runs


@pytest.mark.parametrize("over", [dict(), dict(associative_memory=True, d_mem=4)])
def test_fairseqs_nan_detector_runs_on_the_encoder_and_names_the_module(over, caplog):
    """fairseq-train reruns a step whose gradients are non-finite under fairseq's NanDetector (hooks on every
    module) to name where the NaN starts. The encoder's forward and backward run under it (calling fairseq's
    TransformerEncoder as a module, whose output is a dict of lists, made torch raise StopIteration there, which
    replaced fairseq's "gradients are Nan/Inf"), and a NaN entering a layer is named."""
    import logging

    from fairseq.nan_detector import NanDetector

    model = build(seed=0, **over)
    x = words((2, 2 * T), torch.Generator().manual_seed(0))
    target = torch.full_like(x, IGNORE)
    target[:, T] = 1
    layer = model.encoder.sentence_encoder.layers[1]
    hook = layer.register_forward_pre_hook(lambda m, args: (args[0] * float("nan"), *args[1:]))
    with caplog.at_level(logging.WARNING), NanDetector(model):
        losses, _ = model(x, segment_len=T, target=target)
        losses.sum().backward()
    hook.remove()
    assert not torch.isfinite(losses).all()
    assert any("NaN detected in output of encoder.sentence_encoder.layers.1" in r.getMessage() for r in caplog.records)


# ---- what the encoder records when built for training, and checks when built from a checkpoint (issue 28) ---------


def test_the_encoder_records_its_dictionary_and_segment_length_and_checks_them_when_loaded(caplog):
    from rmt_fairseq.models.trained_with import dictionary_fingerprint

    model = build()
    assert model.trained_with == {"dictionary_fingerprint": dictionary_fingerprint(DICT), "trained_segment_len": T}
    assert model.encoder.segment_len == T
    x = torch.randint(FIRST, FIRST + WORDS, (2, 3 * T))
    with torch.no_grad():  # the forward's segment length defaults to the recorded one
        assert torch.equal(model(x), model(x, segment_len=T))
    # built again from that record (a checkpoint's config): nothing new to record, the same data passes
    again = build(dictionary_fingerprint=dictionary_fingerprint(DICT), trained_segment_len=T)
    assert again.trained_with == {} and again.encoder.trained_segment_len == T
    # another dictionary (the same size, two tokens swapped): one line naming the checkpoint and the data
    other = make_dictionary()
    other.symbols[FIRST], other.symbols[FIRST + 1] = other.symbols[FIRST + 1], other.symbols[FIRST]
    with pytest.raises(RMTConfigError, match=r"the checkpoint /x/checkpoint_last.pt was trained with another "
                                             r"dictionary than the data's dict.txt"):
        build(task=make_task(dictionary=other), dictionary_fingerprint=dictionary_fingerprint(DICT),
              checkpoint_file="/x/checkpoint_last.pt")
    # another segment length: it runs at the task's and says so
    with caplog.at_level("WARNING"):
        shorter = build(task=make_task(tokens_per_sample=T // 2), trained_segment_len=T)
    assert shorter.encoder.segment_len == T // 2 and shorter.encoder.trained_segment_len == T
    assert f"segment length {T // 2} (--tokens-per-sample), not the {T} the model was trained with" in caplog.text
