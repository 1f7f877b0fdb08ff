"""Long streams hold constant state (issue 6, item 6; the multi-million-token figure is
benchmarks/long_stream.py): after many segments, evaluation and training keep the same number and size of live
tensors, and carried memory never holds an autograd graph across batches."""

import gc

import pytest
import torch

from helpers import tiny_model
from rmt_fairseq.modules.recurrence import RecurrentState, run_segments


def _live_tensors():
    gc.collect()
    ts = [o for o in gc.get_objects() if torch.is_tensor(o)]
    return len(ts), sum(t.numel() * t.element_size() for t in ts if not t.is_sparse)


@pytest.mark.parametrize("mem_len", [0, 8])
def test_streaming_evaluation_over_many_segments_keeps_memory_constant(mem_len):
    model = tiny_model(mem_tokens=3, mem_len=mem_len).eval()
    state = RecurrentState()
    seg = torch.randint(4, 40, (2, 8))
    with torch.no_grad():
        for _ in range(50):
            run_segments(model.decoder, seg, seg, state, seg_len=8)
        n0, bytes0 = _live_tensors()
        for _ in range(1500):
            run_segments(model.decoder, seg, seg, state, seg_len=8)
        n1, bytes1 = _live_tensors()
    assert (n1, bytes1) == (n0, bytes0)
    assert state.segments_seen == 1550


@pytest.mark.parametrize("mode,K", [("block", 1), ("sliding", 2)])
def test_training_over_many_batches_keeps_memory_constant_and_graph_free(mode, K):
    model = tiny_model(mem_tokens=3).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    state = RecurrentState()
    x = torch.randint(4, 40, (2, 8 * (K + 1 if mode == "block" else 1)))

    def update():
        opt.zero_grad(set_to_none=False)
        out = run_segments(model.decoder, x, x, state, seg_len=8, bptt_unroll=K, bptt_mode=mode)
        torch.stack(out.losses).sum().backward()
        opt.step()
        assert state.memory.grad_fn is None and all(w.memory is None or w.memory.grad_fn is None
                                                    for w in state.window)

    for _ in range(20):
        update()
    n0, bytes0 = _live_tensors()
    for _ in range(300):
        update()
    assert _live_tensors() == (n0, bytes0)
