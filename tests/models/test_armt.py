"""ARMT (modules/associative.py) against a hand-written reference of the paper's equations; the model with its write
projection at zero against the model without ARMT; its state saved, resumed and reset; the diagonal schedule
against the sequential one (modules/recurrence.py). Gradient reach under block / sliding truncation and segment
checkpointing is in tests/modules/test_recurrence.py (family "armt")."""

import io
import math

import pytest
import torch

from helpers import armt_with_values, tiny_model
from rmt_fairseq.errors import RMTConfigError
from rmt_fairseq.modules import associative
from rmt_fairseq.modules.recurrence import RecurrentState, run_segments

EPS = 1e-5


# ---- the reference: the paper's equations, one value at a time ------------------------------------------------


def ref_phi(x, nu):
    """DPFP (Schlag et al. 2021) written out: r = [relu(x), relu(-x)]; value (j, i) = r_i * r_{(i - j) mod 2D}
    for j = 1..nu; then divided by its L2 norm (the authors' code)."""
    r = [max(float(v), 0.0) for v in x] + [max(-float(v), 0.0) for v in x]
    n = len(r)
    out = [r[i] * r[(i - j) % n] for j in range(1, nu + 1) for i in range(n)]
    norm = math.sqrt(sum(v * v for v in out))
    return torch.tensor([v / max(norm, 1e-12) for v in out], dtype=torch.float64)


def ref_write(block, mem, A, z, rule="parallel"):
    """One stream: mem M x C -> (A F x C, z F). parallel: every memory token j uses the state before this segment
    (the authors' code); sequential: token j uses the state tokens 1..j-1 left (the delta rule token by token)."""
    nu = block.nu
    Wk, Wv = block.k_proj.weight.double(), block.v_proj.weight.double()
    wb, bb = block.beta_proj.weight.double()[0], block.beta_proj.bias.double()[0]
    first = A is None
    F_, C = block.feature_dim, mem.size(1)
    A0 = torch.zeros(F_, C, dtype=torch.float64) if first else A.clone()
    z0 = torch.zeros(F_, dtype=torch.float64) if first else z.clone()
    A1, z1 = A0.clone(), z0.clone()
    for j, m in enumerate(mem.double()):
        k = ref_phi(Wk @ m, nu)
        v = Wv @ m
        beta = 1.0 / (1.0 + math.exp(-float(wb @ m + bb)))
        As, zs = (A1.clone(), z1.clone()) if rule == "sequential" else (A0, z0)
        if first and (rule == "parallel" or j == 0):
            vbar, gamma = torch.zeros(C, dtype=torch.float64), 1.0
        else:
            den = float(zs @ k) + EPS
            vbar = (As.T @ k) / den
            gamma = min(max(1.0 - den / float(k @ k), 0.0), 1.0)
        A1 += beta * torch.outer(k, v - vbar)
        z1 += gamma * k
    return A1, z1


def ref_read(block, x, A, z):
    """One stream: x N x C -> x + A^T phi(q) / (z . phi(q) + eps) per row (x itself before anything is stored)."""
    if A is None:
        return x.double()
    rows = []
    for xi in x.double():
        q = ref_phi(block.q_proj.weight.double() @ xi, block.nu)
        rows.append(xi + (A.T @ q) / (float(z @ q) + EPS))
    return torch.stack(rows)


@pytest.mark.parametrize("rule", associative.WRITE_RULES)
def test_update_and_read_equal_the_reference_over_three_segments(rule):
    torch.manual_seed(0)
    C, D, M, N, B = 6, 3, 4, 5, 2
    block = associative.AssociativeMemory(C, D, nu=3, write_rule=rule).double()
    with torch.no_grad():
        block.v_proj.weight.normal_(0, 0.5)  # zero at the start; non-zero to store something
    assert block.feature_dim == 2 * 3 * D
    A = z = None
    refs = [(None, None)] * B
    for seg in range(3):
        x, mem = torch.randn(B, N, C, dtype=torch.float64), torch.randn(B, M, C, dtype=torch.float64)
        got_read = block.read(x, A, z, torch.float64)
        for b in range(B):
            torch.testing.assert_close(got_read[b], ref_read(block, x[b], *refs[b]), rtol=1e-9, atol=1e-9)
        A, z = block.write(mem, A, z, torch.float64)
        refs = [ref_write(block, mem[b], *refs[b], rule=rule) for b in range(B)]
        for b in range(B):
            torch.testing.assert_close(A[b], refs[b][0], rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(z[b], refs[b][1], rtol=1e-9, atol=1e-9)
    # the correction term is active: after the first segment some gamma is below 1 (z grows slower than sum phi)
    assert not torch.allclose(refs[0][1], torch.zeros_like(refs[0][1]))


def test_a_key_written_alone_is_read_back():
    """The delta rule's purpose: write value v at key k, then reading with q = k returns (about) v."""
    torch.manual_seed(1)
    C, D = 8, 4
    block = associative.AssociativeMemory(C, D, nu=3).double()
    with torch.no_grad():
        block.v_proj.weight.copy_(torch.eye(C))  # v = m
        block.q_proj.weight.copy_(block.k_proj.weight)  # q = k for the same vector
        block.beta_proj.bias.fill_(20.0)  # beta = 1
        block.beta_proj.weight.zero_()
    m = torch.randn(1, 1, C, dtype=torch.float64)
    A, z = block.write(m, None, None, torch.float64)
    read = block.read(m, A, z, torch.float64) - m  # the read alone
    torch.testing.assert_close(read, m, rtol=1e-4, atol=1e-4)


def _segments(model, x, state=None, schedule="sequential", seg_len=8):
    with torch.no_grad():
        out = run_segments(model.decoder, x, x, state if state is not None else RecurrentState(), seg_len=seg_len,
                           return_hidden=True, schedule=schedule)
    return torch.cat(out.hidden, dim=1), torch.stack(out.losses)


def test_zero_write_projection_computes_what_the_model_without_armt_computes():
    armt = tiny_model(associative_memory=True, d_mem=8, mem_tokens=3, seed=0).eval()
    plain = tiny_model(associative_memory=False, mem_tokens=0, seed=0).eval()
    shared = {k: v for k, v in armt.state_dict().items() if not k.startswith(("decoder.memory.", "decoder.assoc"))}
    plain.load_state_dict(shared, strict=True)
    x = torch.randint(4, 40, (2, 8 * 5))
    state = RecurrentState()
    h_armt, l_armt = _segments(armt, x, state)
    h_plain, l_plain = _segments(plain, x)
    torch.testing.assert_close(h_armt, h_plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(l_armt, l_plain, rtol=1e-6, atol=1e-5)
    assert all(float(A.abs().max()) == 0.0 for A in state.assoc[0::2])  # nothing is stored while W_V is zero


def armt_model(seed=0, v_std=0.3, **kw):
    """An ARMT tiny_model whose W_V is random (N(0, v_std)), so that the associative memory stores something."""
    return armt_with_values(tiny_model(**{"associative_memory": True, "d_mem": 8, "seed": seed, **kw}).eval(),
                            std=v_std, seed=seed + 11)


def test_state_saved_and_resumed_continues_bitwise_and_reset_starts_over():
    model = armt_model(mem_len=5)
    x = torch.randint(4, 40, (3, 8 * 6))
    whole, _ = _segments(model, x)
    state = RecurrentState()
    first, _ = _segments(model, x[:, : 8 * 3], state)
    buf = io.BytesIO()
    torch.save(state.state_dict(), buf)
    buf.seek(0)
    resumed = RecurrentState()
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert resumed.segments_seen == 3 and len(resumed.assoc) == 2 * model.decoder.num_layers
    second, _ = _segments(model, x[:, 8 * 3 :], resumed)
    assert torch.equal(torch.cat([first, second], dim=1), whole)
    resumed.reset()
    assert resumed.assoc is None and resumed.segments_seen == 0
    again, _ = _segments(model, x[:, : 8 * 3], resumed)
    assert torch.equal(again, first)


LAYOUTS = {"armt": dict(associative_memory=True), "armt+xl": dict(associative_memory=True, mem_len=5),
           "xl": dict(mem_tokens=0, mem_len=6), "none": dict(mem_tokens=0), "mt": dict(memory_layout="mt")}


def _compare_schedules(model, x, tol):
    s_seq, s_diag = RecurrentState(), RecurrentState()
    h_seq, l_seq = _segments(model, x, s_seq)
    h_diag, l_diag = _segments(model, x, s_diag, schedule="diagonal")
    torch.testing.assert_close(h_diag, h_seq, rtol=tol, atol=tol)
    torch.testing.assert_close(l_diag, l_seq, rtol=tol, atol=tol)
    assert s_diag.segments_seen == s_seq.segments_seen
    assert (s_diag.assoc is None) == (s_seq.assoc is None) and (s_diag.cache is None) == (s_seq.cache is None)
    for a, b in zip((s_diag.assoc or []) + (s_diag.cache or []), (s_seq.assoc or []) + (s_seq.cache or [])):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    # and from the carried state onwards (a second call continues the streams)
    torch.testing.assert_close(_segments(model, x, s_diag, schedule="diagonal")[0], _segments(model, x, s_seq)[0],
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("length,batch", [(8 * 7 + 5, 3), (8 * 2, 1), (8, 2), (8 * 9, 1), (8 * 30 + 1, 2)])
def test_diagonal_schedule_computes_what_the_sequential_one_computes(layout, length, batch):
    """In float64, where rounding cannot hide a wrong dependency: every layout, length (a short last segment,
    fewer segments than layers, one segment, many) and batch size, the state carried on included."""
    make = armt_model if "armt" in layout else (lambda **k: tiny_model(**k).eval())
    model = make(decoder_layers=4, associative_state_dtype="model", **LAYOUTS[layout]).double()
    assert model.decoder.diagonal_ok
    _compare_schedules(model, torch.randint(4, 40, (batch, length)), tol=1e-10)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("length,batch", [(8 * 7 + 5, 3), (8 * 9, 1)])
def test_diagonal_schedule_in_fp32_rounds_no_worse_than_the_sequential_one(layout, length, batch):
    """In fp32 a bmm over several layers does not round as one mm per layer, so the two schedules differ by
    rounding, which the associative state carries on. The sequential schedule's own results differ as much between
    batch sizes (the same streams run together or one at a time): the diagonal one must stay within 1e-5 or within
    twice that difference."""
    make = armt_model if "armt" in layout else (lambda **k: tiny_model(**k).eval())
    model = make(decoder_layers=4, **LAYOUTS[layout])
    x = torch.randint(4, 40, (batch, length))
    h_seq, _ = _segments(model, x)
    h_diag, _ = _segments(model, x, schedule="diagonal")
    h_alone = torch.cat([_segments(model, x[i : i + 1])[0] for i in range(batch)])
    h_pairs = (torch.cat([_segments(model, x[i : i + 2])[0] for i in range(0, batch, 2)]) if batch > 1 else
               _segments(model, x.repeat(2, 1))[0][:1])  # the same streams in other batch shapes
    rounding = max(float((h_alone - h_seq).abs().max()), float((h_pairs - h_seq).abs().max()))
    assert float((h_diag - h_seq).abs().max()) <= max(1e-5, 2 * rounding)


def test_one_layer_of_the_diagonal_schedule_is_bitwise_the_sequential_layer():
    d = armt_model(decoder_layers=2).decoder
    x = torch.randint(4, 40, (2, 16))
    with torch.no_grad():
        first = d.forward_segment(x[:, :8], None, None, assoc=None)
        h, tables = d.diagonal_begin(x[:, 8:], 0)
        _, _, pos_emb, rel_index, mask_bias = tables
        A, z = first.assoc[0], first.assoc[1]
        want = d.layers[0](d.assoc_layers[0].read(h, A, z, d.assoc_dtype), None, pos_emb, rel_index, mask_bias,
                           *d.pos_bias())
        got, _, (A1, z1) = d.diagonal_layers(0, h[None], [tables], None, [A[None], z[None]], d.diagonal_weights())
    assert torch.equal(got[0], want)
    wA, wz = d.assoc_layers[0].write(want[:, 8:], A, z, d.assoc_dtype)
    assert torch.equal(A1[0], wA) and torch.equal(z1[0], wz)


def test_rmt_token_memory_is_never_diagonalised():
    model = tiny_model(decoder_layers=3).eval()  # RMT: write memory of the last layer -> read memory of the first
    assert not model.decoder.diagonal_ok
    x = torch.randint(4, 40, (2, 8 * 4))
    assert torch.equal(_segments(model, x, schedule="diagonal")[0], _segments(model, x)[0])


def test_model_forward_uses_the_configured_schedule_and_keeps_the_state_in_fp32_under_bf16():
    model = armt_model(inference_schedule="diagonal", decoder_layers=3)
    x = torch.randint(4, 40, (2, 8 * 4))
    seq = armt_model(decoder_layers=3)
    with torch.no_grad():
        a = model(x, target=x, rmt_state=RecurrentState())[0]
        b = seq(x, target=x, rmt_state=RecurrentState())[0]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    model.to(torch.bfloat16)
    state = RecurrentState()
    with torch.no_grad():
        losses, extra = model(x, target=x, rmt_state=state)
    assert torch.isfinite(losses).all() and bool(extra["memory_ok"].all())
    assert {t.dtype for t in state.assoc} == {torch.float32}
    model.decoder.assoc_dtype = None  # --associative-state-dtype model
    state = RecurrentState()
    with torch.no_grad():
        model(x, target=x, rmt_state=state)
    assert {t.dtype for t in state.assoc} == {torch.bfloat16}


def test_a_nonfinite_associative_state_is_reported_per_segment():
    model = armt_model()
    state = RecurrentState()
    x = torch.randint(4, 40, (2, 8 * 2))
    with torch.no_grad():
        model(x, target=x, rmt_state=state)
    state.assoc[0] = torch.full_like(state.assoc[0], float("nan"))
    with torch.no_grad():
        _, extra = model(x, target=x, rmt_state=state)
    assert extra["memory_ok"].tolist() == [False, False]


@pytest.mark.parametrize("flags,message", [
    (dict(d_mem=0), "--d-mem must be >= 1, got 0"),
    (dict(dpfp_nu=0), "--dpfp-nu must be >= 1, got 0"),
    (dict(mem_tokens=0), "--mem-tokens must be > 0, got 0"),
    (dict(memory_layout="mt"), "--memory-layout mt has none"),
])
def test_bad_armt_flags_are_one_line(flags, message):
    with pytest.raises(RMTConfigError, match=message.replace("(", r"\(")):
        tiny_model(associative_memory=True, **flags)


def test_a_checkpoint_from_before_the_write_rule_flag_loads_with_the_rule_it_was_trained_with():
    """Checkpoints written before --associative-write computed the parallel write; the loader
    (rmt_fairseq/checkpoints.py) names that rule in their config, and leaves a recorded rule alone."""
    from omegaconf import OmegaConf

    from rmt_fairseq.checkpoints import _record_source

    old = {"cfg": {"model": OmegaConf.create({"dictionary_fingerprint": "ab", "associative_memory": True})}}
    assert _record_source(old, "/x/old.pt")["cfg"]["model"].associative_write == "parallel"
    new = {"cfg": {"model": OmegaConf.create({"dictionary_fingerprint": "ab", "associative_memory": True,
                                              "associative_write": "sequential"})}}
    assert _record_source(new, "/x/new.pt")["cfg"]["model"].associative_write == "sequential"
    model = tiny_model(mem_tokens=3, associative_memory=True, d_mem=4, associative_write="parallel")
    assert {block.write_rule for block in model.decoder.assoc_layers} == {"parallel"}
