"""The memory scheme (modules/schemes.py): chosen from the flags for every family, and the gated write, a variant
added as one scheme (no family code of its own), behaving as its rule says in each of the three families."""

import types

import pytest
import torch

from helpers import dictionary, tiny_model, tiny_wrapper
from rmt_fairseq.models.rmt_encoder import RMTEncoderConfig, RMTEncoderModel
from rmt_fairseq.modules.recurrence import RecurrentState, run_segments
from rmt_fairseq.modules.schemes import ARMT, MT, RMT, GatedRMT, HardGatedRMT, MemoryScheme, scheme_from

T = 8


def encoder(**overrides):
    torch.manual_seed(0)
    cfg = dict(encoder_layers=2, encoder_embed_dim=32, encoder_ffn_embed_dim=64, encoder_attention_heads=2,
               max_positions=64, dropout=0.0, attention_dropout=0.0, mem_tokens=3, tokens_per_sample=T)
    cfg.update(overrides)
    task = types.SimpleNamespace(source_dictionary=dictionary(40), num_classes=3,
                                 cfg=types.SimpleNamespace(tokens_per_sample=T))
    return RMTEncoderModel.build_model(RMTEncoderConfig(**cfg), task)


FAMILIES = {"rmt_lm": lambda **k: tiny_model(**k).decoder, "rmt_transformer_lm": lambda **k: tiny_wrapper(**k).decoder,
            "rmt_encoder": lambda **k: encoder(**k).encoder}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("flags,kind", [(dict(mem_tokens=0), MemoryScheme), (dict(), RMT),
                                        (dict(memory_layout="mt"), MT), (dict(memory_layout="gated"), GatedRMT),
                                        (dict(memory_layout="gated_hard"), HardGatedRMT),
                                        (dict(associative_memory=True), ARMT)])
def test_every_family_takes_its_scheme_from_the_flags(family, flags, kind):
    module = FAMILIES[family](**flags)
    assert type(module.scheme) is kind
    assert module.recurrent == kind.carries_tokens and module.associative == kind.associative
    assert module.diagonal_ok == (not kind.carries_tokens)
    names = {n.split(".")[0] for n, _ in module.named_parameters()}
    assert ("memory_gate" in names) == issubclass(kind, GatedRMT) and ("assoc_layers" in names) == (kind is ARMT)


def _memories(module, x, n):
    """The memory carried after each of the first n segments of x (one call per segment, no gradient)."""
    state, out = RecurrentState(), []
    with torch.no_grad():
        for s in range(n):
            run_segments(module, x[:, s * T : (s + 1) * T], None, state, seg_len=T)
            out.append(state.memory)
    return out


def _gate_bias(module, value):
    with torch.no_grad():
        module.memory_gate.bias.fill_(value)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_closed_gate_keeps_the_initial_memory_and_an_open_one_is_rmt(family):
    """z = sigmoid(b) with W_z = 0: b = -30 gives z = 0 exactly (the memory never changes from the learned initial
    one), b = +30 gives z = 1 (the written memory, as RMT carries it: the same weights without the gate compute it
    bitwise)."""
    gated, plain = FAMILIES[family](memory_layout="gated"), FAMILIES[family]()
    plain.load_state_dict({k: v for k, v in gated.state_dict().items() if not k.startswith("memory_gate.")})
    gated.eval(), plain.eval()
    x = torch.randint(4, 40, (2, 3 * T))
    _gate_bias(gated, -30.0)
    init = gated.initial_memory(2).detach()
    for m in _memories(gated, x, 3):
        assert torch.equal(m, init)
    _gate_bias(gated, 30.0)
    for a, b in zip(_memories(gated, x, 3), _memories(plain, x, 3)):
        assert torch.equal(a, b)
    assert not torch.equal(_memories(plain, x, 1)[0], init)  # RMT's memory does change


@pytest.mark.parametrize("family", list(FAMILIES))
def test_the_half_open_gate_mixes_the_written_and_the_read_memory(family):
    """At the start (W_z = 0, b_z = 0) z = 1/2: the carried memory is the mean of what the write rows produce (the
    open gate's memory from the same entering memory) and the memory read."""
    gated = FAMILIES[family](memory_layout="gated").eval()
    x = torch.randint(4, 40, (2, 2 * T))
    first = _memories(gated, x, 1)[0]
    _gate_bias(gated, 30.0)
    written = _memories(gated, x, 1)[0]  # z = 1: the written rows themselves
    init = gated.initial_memory(2).detach()
    torch.testing.assert_close(first, 0.5 * written + 0.5 * init, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_hard_gate_closed_keeps_the_memory_bitwise_where_a_sigmoid_gate_leaks(family):
    """gated_hard: z = hardsigmoid(a) is exactly 0 for a <= -3, so with the gate's bias at -4 (and small random
    W_z) 24 segments leave the learned initial memory bit for bit; the sigmoid gate at the same weights lets it
    drift. At the start (W_z = 0, b_z = 0) both gates are 1/2 and carry the same memory."""
    hard, soft = FAMILIES[family](memory_layout="gated_hard"), FAMILIES[family](memory_layout="gated")
    soft.load_state_dict(hard.state_dict())
    hard.eval(), soft.eval()
    x = torch.randint(4, 40, (2, 24 * T))
    for a, b in zip(_memories(hard, x, 2), _memories(soft, x, 2)):
        assert torch.equal(a, b)
    with torch.no_grad():
        hard.memory_gate.weight.normal_(0, 0.01)
    soft.load_state_dict(hard.state_dict())
    _gate_bias(hard, -4.0), _gate_bias(soft, -4.0)
    init = hard.initial_memory(2).detach()
    assert all(torch.equal(m, init) for m in _memories(hard, x, 24))
    assert not torch.equal(_memories(soft, x, 24)[-1], init)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("layout,z", [("gated", 1 / (1 + 2.718281828459045 ** 2)), ("gated_hard", 1 / 6)])
def test_the_gate_bias_flag_sets_how_much_the_first_write_lets_in(family, layout, z):
    """--memory-gate-bias -2: the gate starts at sigmoid(-2) (gated) or hardsigmoid(-2) = 1/6 (gated_hard), so the
    first carried memory is z x the written rows + (1 - z) x the memory read, in every family."""
    gated = FAMILIES[family](memory_layout=layout, memory_gate_bias=-2.0).eval()
    assert torch.equal(gated.memory_gate.bias, torch.full_like(gated.memory_gate.bias, -2.0))
    x = torch.randint(4, 40, (2, 2 * T))
    first = _memories(gated, x, 1)[0]
    _gate_bias(gated, 30.0)
    written = _memories(gated, x, 1)[0]
    init = gated.initial_memory(2).detach()
    torch.testing.assert_close(first, z * written + (1 - z) * init, rtol=0, atol=1e-5)


@pytest.mark.parametrize("flags,error", [
    (dict(memory_gate_bias=-2.0), "--memory-gate-bias initialises the update gate of --memory-layout gated or "
                                  "gated_hard; --memory-layout rmt has none (got --memory-gate-bias -2.0)"),
    (dict(memory_layout="gated_hard", memory_gate_bias=-3.0), "--memory-gate-bias must be in (-3, 3) for "
                                                              "--memory-layout gated_hard"),
    (dict(memory_gate_input="read"), "--memory-gate-input chooses the update gate's input of --memory-layout gated "
                                     "or gated_hard; --memory-layout rmt has none (got --memory-gate-input read)"),
])
def test_a_gate_bias_that_cannot_be_honoured_is_refused(flags, error):
    from rmt_fairseq.errors import RMTConfigError
    from rmt_fairseq.models.config import validate_memory

    cfg = RMTEncoderConfig(mem_tokens=3, **flags)
    with pytest.raises(RMTConfigError) as e:
        validate_memory(cfg)
    assert error in str(e.value)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_gate_on_the_read_alone_once_closed_stays_closed_where_one_on_both_opens(family):
    """--memory-gate-input read: z = hardsigmoid(W_z r + b_z) sees the memory read alone, so a slot closed on every
    channel sees the same input in every later segment and keeps its memory bit for bit, whatever the segments
    bring. The same read weights with the written rows as a second input (the default) open on some segment."""
    torch.manual_seed(1)
    by_read = FAMILIES[family](memory_layout="gated_hard", memory_gate_input="read").eval()
    both = FAMILIES[family](memory_layout="gated_hard").eval()
    assert by_read.memory_gate.in_features == both.memory_gate.in_features // 2
    both.load_state_dict({k: v for k, v in by_read.state_dict().items() if not k.startswith("memory_gate.")},
                         strict=False)
    init = by_read.initial_memory(2).detach()  # 2 x M x C
    with torch.no_grad():
        by_read.memory_gate.weight.normal_(0, 0.5)
        a = by_read.memory_gate(init[0])  # M x C: the gate's pre-activation on the initial memory
        by_read.memory_gate.bias.sub_(a.max(0).values + 3.5)  # every channel of every slot at or below -3.5
        C = init.size(-1)
        both.memory_gate.weight.normal_(0, 0.5)  # the written rows' half
        both.memory_gate.weight[:, C:] = by_read.memory_gate.weight  # the read half: by_read's
        both.memory_gate.bias.copy_(by_read.memory_gate.bias)
    x = torch.randint(4, 40, (2, 24 * T))
    assert all(torch.equal(m, init) for m in _memories(by_read, x, 24))
    assert not torch.equal(_memories(both, x, 24)[-1], init)


def test_the_gate_learns_through_the_carried_memory():
    model = tiny_model(memory_layout="gated").train()
    x = torch.randint(4, 40, (2, 3 * T))
    losses, _ = model(x, target=x, rmt_state=RecurrentState(), bptt_unroll=2)
    losses.sum().backward()
    gate = model.decoder.memory_gate
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0 and gate.bias.grad.abs().sum() > 0


def test_scheme_from_any_config():
    cfg = types.SimpleNamespace(mem_tokens=4, memory_layout="rmt", associative_memory=False, mem_len=6,
                                associative_state_dtype="fp32")
    s = scheme_from(cfg)
    assert (type(s), s.before, s.after, s.mem_len) == (RMT, 4, 4, 6)
    s = scheme_from(cfg, causal=False)
    assert (s.before, s.after, s.written(1, 8)) == (4, 0, slice(1, 5))
    cfg.associative_memory = True
    s = scheme_from(cfg)
    assert (type(s), s.before, s.after, s.written(0, 8)) == (ARMT, 0, 4, slice(8, 12))


def test_the_gated_preset_trains_from_fairseq_train_and_scores_with_eval_lm(recall_data, tmp_path):
    """The variant as a user runs it: its preset, fairseq-train's summary line naming it, its gate saved in the
    checkpoint, fairseq-eval-lm on that checkpoint."""
    from helpers import cli

    p = cli("fairseq-train", recall_data, "--user-dir", "user_dir", "--task", "rmt_lm", "--arch", "rmt_gated_tiny",
            "--criterion", "rmt_cross_entropy", "--tokens-per-sample", T, "--batch-size", 4, "--optimizer", "adam",
            "--lr", "1e-3", "--cpu", "--max-update", 6, "--num-workers", 0, "--log-format", "simple",
            "--disable-validation", "--no-epoch-checkpoints", "--save-dir", tmp_path)
    log = p.stdout + p.stderr
    assert "training with memory: RMT with a gated write, 4 memory tokens (--mem-tokens, --memory-layout gated)" in log
    state = torch.load(tmp_path / "checkpoint_last.pt", weights_only=False)
    assert state["cfg"]["model"]["memory_layout"] == "gated" and "decoder.memory_gate.weight" in state["model"]
    e = cli("fairseq-eval-lm", recall_data, "--user-dir", "user_dir", "--task", "rmt_lm", "--path",
            tmp_path / "checkpoint_last.pt", "--batch-size", 4, "--cpu", "--num-workers", 0)
    assert "Loss (base 2)" in e.stdout + e.stderr
