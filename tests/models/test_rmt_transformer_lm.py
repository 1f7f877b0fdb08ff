"""rmt_transformer_lm: fairseq's own transformer_lm decoder with RMT memory tokens, built through fairseq's parsers
under fairseq's own `--task language_modeling`: zero memory == transformer_lm bit for bit, the memory mask by
gradients, gradient through memory across segments (truncation, segment checkpointing), positions of memory and
segment tokens, transformer_lm checkpoints (upgrade, --lm-path), the mirrored presets, per-sample recurrence."""

import argparse

import pytest
import torch
from fairseq import checkpoint_utils, options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY
from fairseq.models.transformer_lm import TransformerLanguageModel
from omegaconf import OmegaConf

from helpers import armt_with_values, build_from_cli_args, cli, diagonal_calls, tiny_model
from rmt_fairseq.errors import RMTConfigError
from rmt_fairseq.models.rmt_transformer_lm import RMTTransformerDecoder, RMTTransformerLanguageModel
from rmt_fairseq.modules.memory import Layout, visibility
from rmt_fairseq.modules.recurrence import RecurrentState, run_segments

SIZES = ["--decoder-layers", 2, "--decoder-embed-dim", 32, "--decoder-ffn-embed-dim", 64,
         "--decoder-attention-heads", 2, "--dropout", 0]
C = 32
PAD, FIRST, VOCAB = 1, 4, 24  # fairseq's pad index; the recall data's dict: 4 specials + 20 words
NORMS = {"sinusoidal": [], "learned-pos": ["--decoder-learned-pos"], "pre-norm": ["--decoder-normalize-before"]}
# fairseq's transformer_lm keeps --decoder-input-dim/--decoder-output-dim at 512 when only --decoder-embed-dim is
# given: the tiny models have its project_in_dim/project_out_dim; this config has neither
NO_PROJECTIONS = ["--decoder-input-dim", C, "--decoder-output-dim", C]


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory):
    """A small fairseq-preprocess'ed corpus (the recall stream) for fairseq's --task language_modeling."""
    root = tmp_path_factory.mktemp("lm_data")
    raw, out = root / "raw", root / "bin"
    cli("rmt-data", "recall", "--out", raw, "--gap", 7, "--train-docs", 200, "--valid-docs", 40, "--test-docs", 40)
    cli("fairseq-preprocess", "--only-source", "--trainpref", raw / "train.txt", "--validpref", raw / "valid.txt",
        "--testpref", raw / "test.txt", "--destdir", out, "--workers", 1)
    return str(out)


def build(data, arch, *extra, tokens_per_sample=8, seed=0):
    """(cfg, task, model) of `--task language_modeling --arch ARCH` with the tiny sizes (EXTRA overrides them)."""
    torch.manual_seed(seed)
    cfg, task, model, _ = build_from_cli_args([data, "--user-dir", "user_dir", "--task", "language_modeling",
                                               "--arch", arch, "--tokens-per-sample", tokens_per_sample, "--cpu",
                                               *SIZES, *extra])
    return cfg, task, model


def build_rmt(data, mem_tokens, segment_len, *extra, tokens_per_sample=None, seed=0):
    return build(data, "rmt_transformer_lm", "--mem-tokens", mem_tokens, "--segment-len", segment_len, *extra,
                 tokens_per_sample=tokens_per_sample or segment_len, seed=seed)[2]


def words(shape, seed, low=FIRST, high=VOCAB):
    return torch.randint(low, high, shape, generator=torch.Generator().manual_seed(seed))


def without_memory(sd):
    return {k: v for k, v in sd.items() if not k.startswith("decoder.memory.")}


def test_the_vocabulary_is_what_the_tests_assume(lm_data):
    _, task, _ = build(lm_data, "transformer_lm")
    d = task.source_dictionary
    assert (len(d), d.pad(), d.nspecial) == (VOCAB, PAD, FIRST)


# ---- 1. zero memory tokens == fairseq's transformer_lm, bit for bit ------------------------------------------------


@pytest.mark.parametrize("extra", [*NORMS.values(), NO_PROJECTIONS], ids=[*NORMS.keys(), "no-projections"])
def test_zero_memory_tokens_is_transformer_lm_exactly(lm_data, extra):
    T = 8
    _, _, stock = build(lm_data, "transformer_lm", *extra, tokens_per_sample=T, seed=1)
    model = build_rmt(lm_data, 0, T, *extra, seed=2)
    assert isinstance(model, RMTTransformerLanguageModel) and type(model.decoder) is RMTTransformerDecoder
    assert model.decoder.memory is None
    sd = stock.state_dict()
    assert set(sd) == set(model.state_dict())  # the same parameter and buffer names, nothing added
    assert not torch.equal(sd["decoder.layers.0.fc1.weight"], model.state_dict()["decoder.layers.0.fc1.weight"])
    model.load_state_dict(sd, strict=True)
    stock.eval(), model.eval()

    x = words((3, T), seed=3)  # one segment per sample
    padded = x.clone()
    padded[1, 5:] = PAD  # rows ending in pads
    padded[2, T - 1 :] = PAD
    with torch.no_grad():
        for batch in (x, padded):
            ours, ref = model(batch)[0], stock(batch)[0]
            assert ours.shape == (3, T, VOCAB)
            assert torch.equal(ours, ref)
            assert torch.equal(model.decoder(batch)[0], ref)  # the decoder's own forward (generation) too


# ---- 2. the memory mask, by gradients of forward_segment ---------------------------------------------------------


def segment_rows(dec, tokens, memory, leaf):
    """forward_segment with a leaf to differentiate by: leaf="emb" (token embedding lookup, B x T x C) or "x0"
    (the first layer's input [read | segment | write], N x B x C). Returns (SegmentOutput, the final states of
    all N rows B x N x C, the leaf)."""
    got, hooks = {}, []

    def emb_hook(module, inputs, output):
        got["leaf"] = output.detach().requires_grad_()
        return got["leaf"]

    def x0_hook(module, args):
        got["leaf"] = args[0].detach().requires_grad_()
        return (got["leaf"], *args[1:])

    if leaf == "emb":
        hooks.append(dec.embed_tokens.register_forward_hook(emb_hook))
    else:
        hooks.append(dec.layers[0].register_forward_pre_hook(x0_hook))
    hooks.append(dec.layers[-1].register_forward_hook(lambda m, i, o: got.__setitem__("last", o[0])))
    try:
        out = dec.forward_segment(tokens, memory)
    finally:
        for h in hooks:
            h.remove()
    rows = got["last"] if dec.layer_norm is None else dec.layer_norm(got["last"])
    return out, rows.transpose(0, 1), got["leaf"]


@pytest.mark.parametrize("extra", [NORMS["sinusoidal"], NORMS["pre-norm"]], ids=["post-norm", "pre-norm"])
def test_mask_by_gradients_of_every_row_on_every_row(lm_data, extra):
    """d(row i of the output) / d(row j of the first layer's input) is non-zero exactly where the mask of
    modules/memory.py lets i see j (the mask is closed under composition, so this holds after any number of
    layers): read memory sees only read memory; segment token t sees read memory and tokens <= t, never the
    write memory input; write memory sees everything. Pad positions influence nothing, samples are independent."""
    M, T, B = 3, 6, 2
    dec = build_rmt(lm_data, M, T, *extra).double().eval().decoder
    tokens = words((B, T), seed=4)
    tokens[1, 4:] = PAD  # sample 1: two trailing pads
    memory = torch.randn(B, M, C, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    out, rows, x0 = segment_rows(dec, tokens, memory, "x0")
    N = M + T + M
    assert rows.shape == (B, N, C) and x0.shape == (N, B, C)
    assert torch.equal(out.memory, rows[:, M + T :])  # in the model dim C, for the next segment's input
    assert torch.equal(out.hidden, dec.project_out_dim(rows[:, M : M + T]))
    vis = visibility(Layout(0, M, T, M))
    w = torch.randn(C, dtype=torch.float64, generator=torch.Generator().manual_seed(6))  # LayerNorm rows sum to const
    for b in range(B):
        pad = torch.cat([torch.zeros(M, dtype=torch.bool), tokens[b].eq(PAD), torch.zeros(M, dtype=torch.bool)])
        want = (vis & ~pad[None, :]) | torch.eye(N, dtype=torch.bool)  # + the residual path of every row
        for i in range(N):
            (g,) = torch.autograd.grad((rows[b, i] * w).sum(), [x0], retain_graph=True)
            got = g[:, b].abs().sum(-1) > 0  # N
            assert got.tolist() == want[i].tolist(), (b, i)
            assert g[:, 1 - b].abs().sum() == 0, (b, i)  # another sample: exactly nothing
    # the blocks, spelled out (sample 0, no pads)
    assert vis[:M, :M].all() and not vis[:M, M:].any()  # read memory: itself only
    assert vis[M : M + T, :M].all() and not vis[M : M + T, M + T :].any()  # segment: read, never the write input
    assert torch.equal(vis[M : M + T, M : M + T], torch.ones(T, T, dtype=torch.bool).tril())  # causal
    assert vis[M + T :].all()  # write memory: everything


def test_mask_by_gradients_on_the_inputs_the_caller_gives(lm_data):
    """The same guarantees in terms of forward_segment's own inputs (token embeddings, the memory argument), as
    test_rmt_lm.py asserts them for the core model."""
    M, T, B = 3, 6, 2
    dec = build_rmt(lm_data, M, T).double().eval().decoder
    tokens = words((B, T), seed=7)
    memory = torch.randn(B, M, C, dtype=torch.float64, generator=torch.Generator().manual_seed(8)).requires_grad_()
    out, rows, emb = segment_rows(dec, tokens, memory, "emb")
    assert out.hidden.size(-1) == 512  # after project_out_dim (fairseq's default --decoder-output-dim)
    w = torch.randn(512, dtype=torch.float64, generator=torch.Generator().manual_seed(9))

    def grads(y):
        g_emb, g_mem = torch.autograd.grad((y * w[: y.size(-1)]).sum(), [emb, memory], retain_graph=True,
                                           allow_unused=True)
        return g_emb.abs().sum(-1), (g_mem.abs().sum(-1) if g_mem is not None else torch.zeros(B, M))

    for b in range(B):
        for t in range(T):  # segment token t: read memory, itself and earlier tokens; later tokens exactly 0
            g_emb, g_mem = grads(out.hidden[b, t])
            assert (g_mem[b] > 0).all(), (b, t)
            assert (g_emb[b, : t + 1] > 0).all() and (g_emb[b, t + 1 :] == 0).all(), (b, t)
            assert g_emb[1 - b].sum() == 0 and g_mem[1 - b].sum() == 0
        for j in range(M):  # write memory: every segment token and the read memory
            g_emb, g_mem = grads(out.memory[b, j])
            assert (g_emb[b] > 0).all() and (g_mem[b] > 0).all(), (b, j)
        for j in range(M):  # read memory rows: nothing of the segment
            g_emb, g_mem = grads(rows[b, j])
            assert g_emb.sum() == 0 and (g_mem[b] > 0).all(), (b, j)


def test_mask_behaviour_by_changing_tokens(lm_data):
    """test_rmt_lm.py's test_mask_behaviour_in_the_model, on the wrapper."""
    M, T = 3, 8
    dec = build_rmt(lm_data, M, T).eval().decoder
    x = words((2, T), seed=10)
    memory = torch.randn(2, M, C, generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        o1, h1, _ = segment_rows(dec, x, memory, "x0")
        for t in range(T - 1):
            x2 = x.clone()
            x2[:, t + 1 :] = (x2[:, t + 1 :] - FIRST + 7) % (VOCAB - FIRST) + FIRST  # change every token after t
            o2, h2, _ = segment_rows(dec, x2, memory, "x0")
            assert torch.allclose(o1.hidden[:, : t + 1], o2.hidden[:, : t + 1], atol=1e-6)
            assert not torch.allclose(o1.hidden[:, t + 1 :], o2.hidden[:, t + 1 :], atol=1e-4)
            assert torch.allclose(h1[:, :M], h2[:, :M], atol=1e-6)  # read memory rows: unchanged
        for t in range(T):  # write memory changes when any one segment token changes
            x2 = x.clone()
            x2[:, t] = (x2[:, t] - FIRST + 1) % (VOCAB - FIRST) + FIRST
            o2, _, _ = segment_rows(dec, x2, memory, "x0")
            assert (o1.memory - o2.memory).abs().amax(dim=(1, 2)).min() > 1e-5


# ---- 3. gradient through memory across segments, truncation, segment checkpointing --------------------------------

SEG, IDS = 4, 6  # segment length; token ids per segment: segment j uses ids FIRST + IDS*j ... FIRST + IDS*(j+1) - 1


def three_segments(seed=12):
    gen = torch.Generator().manual_seed(seed)
    x = torch.cat([torch.randint(FIRST + IDS * j, FIRST + IDS * (j + 1), (2, SEG), generator=gen) for j in range(3)], 1)
    y = torch.randint(FIRST, VOCAB, (2, 3 * SEG), generator=gen)
    return x, y


def reached(model):
    """Which segments' token embeddings (rows of their id range) got a non-zero gradient, and the initial memory."""
    g = model.decoder.embed_tokens.weight.grad
    segs = [g is not None and bool(g[FIRST + IDS * j : FIRST + IDS * (j + 1)].abs().sum() > 0) for j in range(3)]
    gm = model.decoder.memory.weight.grad
    return segs, gm is not None and bool(gm.abs().sum() > 0)


@pytest.mark.parametrize("unroll,scored,want", [
    (None, 2, [True, True, True]),  # whole sample: the last segment's loss reaches the first segment
    (0, 2, [False, False, True]),  # memory detached after every segment: exactly zero on earlier segments
    (1, 1, [True, True, False]),  # blocks of 2 segments: the 2nd reaches the 1st ...
    (1, 2, [False, False, True]),  # ... and the 3rd starts a new block
])
def test_gradient_flows_through_memory_until_truncated(lm_data, unroll, scored, want):
    assert FIRST + 3 * IDS <= VOCAB
    model = build_rmt(lm_data, 3, SEG, tokens_per_sample=3 * SEG).train()
    assert not model.decoder.share_input_output_embed  # embedding rows get gradient through the input only
    x, y = three_segments()
    out = run_segments(model.decoder, x, y, RecurrentState(), seg_len=SEG, bptt_unroll=unroll)
    assert len(out.losses) == 3
    out.losses[scored].backward()  # a loss on one segment only
    segs, initial_memory = reached(model)
    assert segs == want
    assert initial_memory == want[0]  # the learned initial memory enters the first segment only


@pytest.mark.parametrize("unroll,dropout", [(None, 0.0), (1, 0.0), (None, 0.1)])
def test_checkpoint_segments_gives_the_same_loss_and_gradients(lm_data, unroll, dropout):
    x, y = three_segments()
    results = []
    for ckpt in (False, True):
        model = build_rmt(lm_data, 3, SEG, "--dropout", dropout, tokens_per_sample=3 * SEG, seed=0).train()
        torch.manual_seed(123)  # the same dropout masks (checkpoint replays the RNG state)
        state = RecurrentState()
        out = run_segments(model.decoder, x, y, state, seg_len=SEG, bptt_unroll=unroll, checkpoint_segments=ckpt)
        out.losses[-1].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append(([float(v) for v in out.losses], grads, state.memory))
    (l0, g0, m0), (l1, g1, m1) = results
    assert l1 == pytest.approx(l0, abs=1e-5)
    assert g0.keys() == g1.keys() and "decoder.embed_tokens.weight" in g0
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-6, rtol=1e-5), n
    assert torch.allclose(m0, m1, atol=1e-6)


# ---- 4. positions: none for memory, the stock T-token positions for the segment, restarting per segment -----------


def first_layer_input(model, call):
    got = {}
    h = model.decoder.layers[0].register_forward_pre_hook(lambda m, args: got.__setitem__("x", args[0]))
    try:
        with torch.no_grad():
            call()
    finally:
        h.remove()
    return got["x"].transpose(0, 1)  # B x N x C


@pytest.mark.parametrize("extra", [NORMS["sinusoidal"], NORMS["learned-pos"]], ids=["sinusoidal", "learned-pos"])
def test_memory_gets_no_position_and_segment_tokens_get_the_stock_ones(lm_data, extra):
    M, T = 3, 8
    model = build_rmt(lm_data, M, T, *extra, seed=1).eval()
    _, _, stock = build(lm_data, "transformer_lm", *extra, tokens_per_sample=T, seed=2)
    stock.load_state_dict(without_memory(model.state_dict()), strict=True)
    stock.eval()
    x = words((2, T), seed=13)
    mems = [torch.randn(2, M, C, generator=torch.Generator().manual_seed(s)) for s in (14, 15)]
    ref = first_layer_input(stock, lambda: stock(x))  # embed_scale * embedding + positions 1..T
    for mem in mems:
        x0 = first_layer_input(model, lambda: model.decoder.forward_segment(x, mem))
        assert torch.equal(x0[:, M : M + T], ref)  # whatever the memory: the positions a T-token sample gets
        assert torch.equal(x0[:, :M], mem) and torch.equal(x0[:, M + T :], mem)  # memory: no position added


@pytest.mark.parametrize("extra", [NORMS["sinusoidal"], NORMS["learned-pos"]], ids=["sinusoidal", "learned-pos"])
def test_positions_restart_every_segment(lm_data, extra):
    """Two segments with the same tokens and the same read memory give the same outputs: segment 2 gets
    positions 1..T again, not T+1..2T (which exist: the sample is 2T long)."""
    M, T = 3, 8
    model = build_rmt(lm_data, M, T, *extra, tokens_per_sample=2 * T).eval()
    x = words((2, T), seed=16)
    xx = torch.cat([x, x], dim=1)
    dec = model.decoder
    with torch.no_grad():
        carried = model(xx)[0]
        assert not torch.allclose(carried[:, :T], carried[:, T:], atol=1e-4)  # memory carries segment 1 over
        fixed = torch.randn(2, M, C, generator=torch.Generator().manual_seed(17))
        segment = dec.forward_segment
        dec.forward_segment = lambda tokens, memory, cache=None: segment(tokens, fixed, cache)
        try:
            same = model(xx)[0]
        finally:
            del dec.forward_segment
        assert torch.equal(same[:, :T], same[:, T:])
        assert torch.equal(same[:, :T], dec.output_layer(segment(x, fixed).hidden))


# ---- 5. transformer_lm checkpoints: upgrade, --lm-path -------------------------------------------------------------


def test_upgrade_adds_exactly_the_memory_keys_and_restore_keeps_the_rest(lm_data):
    _, _, stock = build(lm_data, "transformer_lm", seed=1)
    model = build_rmt(lm_data, 3, 8, seed=2)
    own_memory = model.decoder.memory.weight.detach().clone()
    sd = stock.state_dict()
    upgraded = dict(sd)
    model.upgrade_state_dict_named(upgraded, "")
    assert set(upgraded) - set(sd) == {"decoder.memory.weight"} and set(sd) <= set(upgraded)
    assert torch.equal(upgraded["decoder.memory.weight"], own_memory)
    # the --restore-file / --finetune-from-model path: fairseq's strict load of a transformer_lm state dict
    model.load_state_dict(dict(sd), strict=True)
    new = model.state_dict()
    assert torch.equal(new["decoder.memory.weight"], own_memory)
    for k, v in sd.items():
        if not k.endswith("_float_tensor"):  # the sinusoidal table's dtype/device tracker: a dummy, uninitialised
            assert torch.equal(new[k], v), k


def save_checkpoint(path, model, cfg, fmt):
    """A transformer_lm checkpoint the ways fairseq writes them."""
    sd = model.state_dict()
    if fmt == "fairseq-train":  # Trainer.state_dict, written with fairseq's checkpoint_utils
        state = {"args": None, "cfg": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), "model": sd,
                 "criterion": None, "optimizer_history": [], "task_state": {}, "extra_state": {}}
        checkpoint_utils.torch_persistent_save(state, str(path))
    elif fmt == "minimal":
        torch.save({"model": sd, "cfg": {"model": {"_name": cfg.model._name}}}, path)
    elif fmt == "dictconfig":  # re-saved from checkpoint_utils.load_checkpoint_to_cpu, which gives a DictConfig
        torch.save({"model": sd, "cfg": cfg}, path)
    else:  # fairseq releases before hydra: argparse args, no cfg
        torch.save({"model": sd, "args": argparse.Namespace(arch=cfg.model._name), "cfg": None}, path)
    return str(path)


@pytest.mark.parametrize("fmt", ["fairseq-train", "minimal", "dictconfig", "legacy-args"])
def test_lm_path_loads_every_decoder_tensor_unchanged(lm_data, tmp_path, fmt):
    cfg, _, stock = build(lm_data, "transformer_lm", seed=1)
    path = save_checkpoint(tmp_path / "lm.pt", stock, cfg, fmt)
    fresh = build_rmt(lm_data, 3, 8, seed=2)
    model = build_rmt(lm_data, 3, 8, "--lm-path", path, seed=2)
    sd, new = stock.state_dict(), model.state_dict()
    assert set(new) - set(sd) == {"decoder.memory.weight"}
    for k, v in sd.items():
        if not k.endswith("_float_tensor"):  # a dummy buffer (see above)
            assert torch.equal(new[k], v), k
    assert torch.equal(new["decoder.memory.weight"], fresh.state_dict()["decoder.memory.weight"])  # memory is new
    # and with no memory tokens the loaded model is the checkpoint's model
    model0 = build_rmt(lm_data, 0, 8, "--lm-path", path, seed=3).eval()
    x = words((2, 8), seed=18)
    with torch.no_grad():
        assert torch.equal(model0(x)[0], stock.eval()(x)[0])


@pytest.mark.parametrize("arch,extra,shapes", [
    ("transformer_lm", ["--decoder-embed-dim", 48, "--decoder-input-dim", 48, "--decoder-output-dim", 48],
     "(24, 48) in the checkpoint, (24, 32) in this model"),
    ("transformer_lm_gpt2_tiny", ["--decoder-embed-dim", 64], "(24, 64) in the checkpoint, (24, 32) in this model"),
], ids=["transformer_lm", "transformer_lm_gpt2_tiny"])
def test_lm_path_of_another_size_names_the_tensor_and_arch(lm_data, tmp_path, arch, extra, shapes):
    cfg, _, stock = build(lm_data, arch, *extra)
    path = save_checkpoint(tmp_path / "lm.pt", stock, cfg, "fairseq-train")
    with pytest.raises(RMTConfigError) as e:
        build_rmt(lm_data, 3, 8, *NO_PROJECTIONS, "--lm-path", path)
    msg = str(e.value)
    assert f"--lm-path {path}" in msg and "decoder.embed_tokens.weight is " + shapes in msg, msg
    assert f"--arch rmt_{arch} " in msg, msg


def test_lm_path_of_another_model_family_or_no_checkpoint_names_lm_path(lm_data, tmp_path):
    rmt_lm = tiny_model(vocab=VOCAB - FIRST)  # same vocabulary size, another family
    other = tmp_path / "rmt_lm.pt"
    torch.save({"model": rmt_lm.state_dict(), "cfg": {"model": {"_name": "rmt_tiny"}}}, other)
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    for path, why in [(other, "holds a rmt_tiny model, not a transformer_lm one"),
                      (junk, "not a readable fairseq checkpoint"),
                      (tmp_path / "missing.pt", "no such file")]:
        with pytest.raises(RMTConfigError) as e:
            build_rmt(lm_data, 3, 8, "--lm-path", path)
        assert str(e.value).startswith(f"--lm-path {path}") and why in str(e.value), str(e.value)


# ---- 6. presets: every transformer_lm_* of fairseq, mirrored ---------------------------------------------------------

STOCK_PRESETS = sorted(n for n, m in ARCH_MODEL_REGISTRY.items()
                       if m is TransformerLanguageModel and n != "transformer_lm")


def test_every_transformer_lm_preset_is_mirrored_with_the_same_settings():
    assert {"transformer_lm_gpt2_tiny", "transformer_lm_wiki103", "transformer_lm_big"} <= set(STOCK_PRESETS)
    for name in STOCK_PRESETS:
        assert ARCH_MODEL_REGISTRY[f"rmt_{name}"] is RMTTransformerLanguageModel, name
        stock, ours = argparse.Namespace(), argparse.Namespace()
        ARCH_CONFIG_REGISTRY[name](stock)
        ARCH_CONFIG_REGISTRY[f"rmt_{name}"](ours)
        assert vars(stock) == vars(ours), name


def parse(arch):
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, ["DATA", "--user-dir", "user_dir", "--task", "language_modeling",
                                                "--arch", arch])
    return OmegaConf.to_container(convert_namespace_to_omegaconf(args), resolve=True)["model"]


@pytest.mark.parametrize("name", ["transformer_lm_gpt2_tiny", "transformer_lm_wiki103", "transformer_lm_big"])
def test_presets_parse_to_the_stock_settings(name):
    stock, ours = parse(name), parse(f"rmt_{name}")
    assert ours.pop("_name") == f"rmt_{name}" and stock.pop("_name") == name
    assert {k: ours[k] for k in stock} == stock
    assert set(ours) - set(stock) == {"mem_tokens", "segment_len", "segment_bptt_unroll", "lm_path",
                                      "dictionary_fingerprint", "trained_segment_len",
                                      "trained_tokens_per_sample", "trained_memory_reset_interval",
                                      "associative_memory", "d_mem", "dpfp_nu", "associative_write",
                                      "associative_state_dtype", "inference_schedule", "memory_layout",
                                      "memory_gate_bias", "memory_gate_input", "checkpoint_file"}
    assert ours["mem_tokens"] == 10 and ours["associative_memory"] is False
    assert ours["inference_schedule"] == "sequential"
    armt = parse(f"armt_{name}")
    assert {k: armt[k] for k in stock if k != "_name"} == stock
    assert (armt["associative_memory"], armt["d_mem"], armt["mem_tokens"]) == (True, 64, 16)
    assert armt["inference_schedule"] == "diagonal"


def test_gpt2_tiny_preset_builds_the_stock_decoder_plus_memory(lm_data):
    flags = ["--tokens-per-sample", 64, "--segment-len", 16]
    _, _, stock, _ = build_from_cli_args([lm_data, "--user-dir", "user_dir", "--task", "language_modeling", "--arch",
                                          "transformer_lm_gpt2_tiny", "--tokens-per-sample", 64, "--cpu"])
    _, _, ours, _ = build_from_cli_args([lm_data, "--user-dir", "user_dir", "--task", "language_modeling", "--arch",
                                         "rmt_transformer_lm_gpt2_tiny", *flags, "--cpu"])
    shapes = {k: tuple(v.shape) for k, v in stock.state_dict().items()}
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert ours_shapes.pop("decoder.memory.weight") == (10, 64)
    assert ours_shapes == shapes
    assert (stock.decoder.num_layers, stock.decoder.embed_dim) == (2, 64)
    assert ours.decoder.layers[0].self_attn.num_heads == stock.decoder.layers[0].self_attn.num_heads == 1


# ---- 7. per-sample recurrence under fairseq's --task language_modeling -----------------------------------------------


def test_tokens_per_sample_not_a_multiple_of_segment_len_is_refused(lm_data):
    with pytest.raises(RMTConfigError) as e:
        build_rmt(lm_data, 3, 24, tokens_per_sample=64)
    msg = str(e.value)
    assert "--tokens-per-sample 64" in msg and "--segment-len 24" in msg and "--task rmt_lm" in msg, msg


def test_per_sample_forward_scores_every_position_with_fresh_memory(lm_data):
    M, T, S = 3, 16, 64
    cfg, task, model = build(lm_data, "rmt_transformer_lm", "--mem-tokens", M, "--segment-len", T,
                             tokens_per_sample=S)
    model.eval()
    assert model.per_sample and model.decoder.segment_len == T
    calls = []
    segment = model.decoder.forward_segment
    model.decoder.forward_segment = lambda tokens, memory, cache=None: calls.append(tokens.shape) or \
        segment(tokens, memory, cache)
    a, b, c = words((3, S), seed=19)
    with torch.no_grad():
        out = model(torch.stack([a, b]))[0]
        assert out.shape == (2, S, VOCAB) and torch.isfinite(out).all()
        assert calls == [(2, T)] * (S // T)
        del model.decoder.forward_segment
        assert torch.equal(model(torch.stack([a, b]))[0], out)  # memory fresh per call: nothing carried over
        other = model(torch.stack([a, c]))[0]  # row 0 does not depend on the other row
        assert torch.allclose(other[0], out[0], rtol=0, atol=1e-6) and not torch.allclose(other[1], out[1])
        alone = model(a[None])[0]
        assert torch.allclose(alone[0], out[0], rtol=0, atol=1e-6)
        # ... while within a sample memory is carried: changing segment 1 changes the last segment
        a2 = a.clone()
        a2[:T] = (a2[:T] - FIRST + 1) % (VOCAB - FIRST) + FIRST
        changed = model(a2[None])[0]
        assert (changed[0, -T:] - alone[0, -T:]).abs().max() > 1e-4

    # fairseq's own batches, criterion and validation step
    task.load_dataset("valid")
    sample = next(iter(task.get_batch_iterator(task.dataset("valid"), max_sentences=4).next_epoch_itr(shuffle=False)))
    src = sample["net_input"]["src_tokens"]
    assert src.size(1) == S
    with torch.no_grad():
        assert model(**sample["net_input"])[0].shape == (*src.shape, VOCAB)
    criterion = task.build_criterion(cfg.criterion)
    loss, n, _ = task.valid_step(sample, model, criterion)
    assert n == int(sample["target"].ne(PAD).sum()) and torch.isfinite(loss)


@pytest.mark.parametrize("mem_tokens", [3, 0])
def test_a_short_sample_in_a_batch_padded_over_whole_segments(lm_data, mem_tokens):
    """fairseq's language_modeling pads the short last block of a split to the batch's length: the padded row has
    segments of pads only. Its real tokens are scored as if it were alone, and loss and gradients stay finite
    (with no memory tokens such a segment has no visible key at all)."""
    T, S, n = 16, 64, 20
    model = build_rmt(lm_data, mem_tokens, T, tokens_per_sample=S).train()
    x, y = words((2, S), seed=20), words((2, S), seed=21)
    x[1, n:] = PAD
    y[1, n:] = PAD
    with torch.no_grad():
        alone = model(x[1:, :n])[0]
        batched = model(x)[0]
    assert torch.allclose(batched[1, :n], alone[0], rtol=0, atol=1e-5)
    logits = model(x)[0]
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=PAD, reduction="sum")
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("unroll,reaches_first", [(None, True), (0, False)])
def test_segment_bptt_unroll_under_language_modeling(lm_data, unroll, reaches_first):
    extra = [] if unroll is None else ["--segment-bptt-unroll", unroll]
    model = build_rmt(lm_data, 3, SEG, *extra, tokens_per_sample=3 * SEG).train()
    x, y = three_segments()
    logits = model(x)[0]
    loss = torch.nn.functional.cross_entropy(logits[:, -SEG:].flatten(0, 1), y[:, -SEG:].flatten())
    loss.backward()  # the last segment only
    segs, initial_memory = reached(model)
    assert segs == [reaches_first, reaches_first, True] and initial_memory == reaches_first


# ---- 7. ARMT on the wrapper (--associative-memory; modules/associative.py) ---------------------------------------


@pytest.mark.parametrize("extra", [NORMS["sinusoidal"], NORMS["pre-norm"]], ids=["post-norm", "pre-norm"])
def test_armt_with_zero_write_projection_computes_what_transformer_lm_computes_per_segment(lm_data, tmp_path, extra):
    """A pretrained transformer_lm wrapped with ARMT (--lm-path): W_V starts at zero, so nothing is stored and every
    segment computes what the stock model computes on that segment alone (memory tokens sit after the segment,
    which its tokens never see)."""
    T = 8
    cfg, _, stock = build(lm_data, "transformer_lm", *extra, tokens_per_sample=T, seed=1)
    path = save_checkpoint(tmp_path / "lm.pt", stock, cfg, "fairseq-train")
    model = build_rmt(lm_data, 3, T, "--associative-memory", "--d-mem", 4, "--lm-path", path, *extra,
                      tokens_per_sample=4 * T, seed=2).eval()
    assert model.decoder.associative and not model.decoder.recurrent
    assert {k for k in model.state_dict() if k.startswith("decoder.assoc_layers.")}
    x = words((2, 4 * T), seed=5)
    with torch.no_grad():
        ours = model(x)[0]
        ref = torch.cat([stock.eval()(seg)[0] for seg in x.split(T, dim=1)], dim=1)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)


def test_armt_wrapper_carries_the_associative_state_with_gradient_until_truncated(lm_data):
    model = build_rmt(lm_data, 3, 8, "--associative-memory", "--d-mem", 4, "--segment-bptt-unroll", 1, seed=4)
    armt_with_values(model)
    x = words((2, 8 * 3), seed=6)
    leaves = []
    hook = model.decoder.embed_tokens.register_forward_hook(
        lambda m, i, o: leaves.append(o.detach().requires_grad_()) or leaves[-1])
    try:
        state = RecurrentState()
        out = run_segments(model.decoder, x, x, state, seg_len=8, bptt_unroll=1)
    finally:
        hook.remove()
    assert len(state.assoc) == 2 * 2 and state.assoc[0].dtype == torch.float32
    reach = []
    for loss in out.losses:
        grads = torch.autograd.grad(loss, leaves, retain_graph=True, allow_unused=True)
        reach.append([g is not None and bool(g.abs().sum() > 0) for g in grads])
    # block of K+1 = 2 segments: segment 1 reaches segment 0 through the associative memory; segment 2 starts a block
    assert reach == [[True, False, False], [True, True, False], [False, False, True]]


def test_armt_presets_mirror_every_transformer_lm_preset():
    from fairseq.models import ARCH_MODEL_REGISTRY

    stock = [n for n, m in ARCH_MODEL_REGISTRY.items() if m is TransformerLanguageModel]
    assert stock and all(ARCH_MODEL_REGISTRY[f"armt_{n}"] is RMTTransformerLanguageModel for n in stock)


def test_armt_preset_turns_on_associative_memory(lm_data):
    model = build(lm_data, "armt_transformer_lm_gpt2_tiny", "--segment-len", 8, "--d-mem", 4, "--mem-tokens", 2)[2]
    assert model.decoder.associative and model.decoder.num_mem_tokens == 2
    assert model.decoder.assoc_layers[0].d_mem == 4


# ---- 8. the diagonal schedule on the wrapper (--inference-schedule diagonal) ----------------------------------------


def _padded(seed, B=3, S=5, T=8):
    """B streams of S segments; the second ends inside segment 3 (pad after it), the third inside the last."""
    x = words((B, S * T), seed=seed)
    x[1, 2 * T + 3 :] = 1  # fairseq's pad
    x[2, S * T - 5 :] = 1
    return x


@pytest.mark.parametrize("kind,extra", [("armt", []), ("armt", NORMS["pre-norm"]), ("armt", NORMS["learned-pos"]),
                                        ("none", [])], ids=["armt-post-norm", "armt-pre-norm", "armt-learned-pos",
                                                            "no-memory"])
def test_wrapper_diagonal_schedule_equals_sequential(lm_data, kind, extra):
    """Hidden states of every segment and the final associative state: diagonal == sequential to 1e-10 in float64
    (streams with and without padding); the model's forward uses the configured schedule."""
    flags = ["--associative-memory", "--d-mem", 4] if kind == "armt" else []
    model = build_rmt(lm_data, 3 if kind == "armt" else 0, 8, *flags, *extra, tokens_per_sample=40, seed=3)
    if kind == "armt":
        armt_with_values(model)
    model = model.double().eval()
    dec = model.decoder
    assert dec.diagonal_ok
    x = _padded(7)
    runs = {}
    with torch.no_grad():
        for schedule in ("sequential", "diagonal"):
            state = RecurrentState()
            hidden = run_segments(dec, x, None, state, seg_len=8, return_hidden=True, schedule=schedule).hidden
            runs[schedule] = (hidden, state)
    (h_seq, st_seq), (h_diag, st_diag) = runs["sequential"], runs["diagonal"]
    assert len(h_seq) == len(h_diag) == 5
    for a, b in zip(h_seq, h_diag):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-10)
    if kind == "armt":
        assert float(st_seq.assoc[0].abs().max()) > 0
        for a, b in zip(st_seq.assoc, st_diag.assoc):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-10)
    dec.inference_schedule = "sequential"
    with torch.no_grad(), diagonal_calls(dec) as runs:
        want = model(x)[0]
        assert not runs
        dec.inference_schedule = "diagonal"
        got = model(x)[0]
        assert runs
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_wrapper_diagonal_schedule_in_fp32(lm_data):
    """fp32 within 1e-5, with the state continued across calls (chunked streaming)."""
    model = armt_with_values(build_rmt(lm_data, 3, 8, "--associative-memory", "--d-mem", 4, tokens_per_sample=48,
                                       seed=3)).eval()
    x = _padded(8, S=6)
    outs = {}
    with torch.no_grad():
        for schedule in ("sequential", "diagonal"):
            state, hidden = RecurrentState(), []
            for chunk in x.split(3 * 8, dim=1):
                hidden += run_segments(model.decoder, chunk, None, state, seg_len=8, return_hidden=True,
                                       schedule=schedule).hidden
            outs[schedule] = torch.stack(hidden)
    torch.testing.assert_close(outs["diagonal"], outs["sequential"], rtol=0, atol=1e-5)


def test_wrapper_rmt_memory_and_normformer_layers_stay_sequential(lm_data):
    assert not build_rmt(lm_data, 3, 8).decoder.diagonal_ok  # RMT: last layer -> first layer of the next segment
    model = build_rmt(lm_data, 3, 8, "--associative-memory", "--d-mem", 4)
    assert model.decoder.diagonal_ok
    model.decoder.layers[1].attn_ln = torch.nn.LayerNorm(C)  # NormFormer's attention norm (--scale-attn's layer)
    assert not model.decoder.diagonal_ok  # a layer modules/fairseq_layers.py does not write


def test_armt_wrapper_presets_use_the_diagonal_schedule():
    args = argparse.Namespace()
    ARCH_CONFIG_REGISTRY["armt_transformer_lm_gpt2_small"](args)
    assert args.inference_schedule == "diagonal" and args.associative_memory
