"""The pieces of rmt-extrapolate, rmt-plot-attention and the CLIs' help that need no checkpoint: the chance level
and the no-memory bound, recognising the generator of training samples, the plots' marks (colour bar, chance
line, trained length) and defaults shown in --help. The CLIs on a real checkpoint:
tests/e2e/test_tools_from_checkpoint.py."""

import random

import numpy as np
import pytest

from rmt_fairseq.cli import data as data_cli
from rmt_fairseq.cli import demo
from rmt_fairseq.cli.extrapolate import chance, no_memory_bound, plot, recognise
from rmt_fairseq.cli.plot_attention import attention_figure
from rmt_fairseq.data.algorithmic import GENERATORS, line


def test_no_memory_bound():
    # the demo's layout: 10 symbols, <gen>, the source twice = 31 tokens in segments of 11. Certain: the first
    # copy's first symbol (predicted at <gen>, which shares segment 0 with the source) and its second copy
    # (position 21, predicted from 20: segment 1 holds position 11); the other 18 are guesses at 1/10
    assert no_memory_bound("copy", 10, 11, 10) == pytest.approx(100 * (2 + 18 / 10) / 20)
    assert no_memory_bound("copy", 10, 11, 10) >= 18.71  # the demo's trained no-memory model (README)
    for task, n in [("copy", 10), ("reverse", 7), ("associative_retrieval", 4)]:
        assert no_memory_bound(task, n, 1000, 10) == 100.0  # one segment holds everything
    # segments of one token: nothing is ever seen with what it predicts
    assert no_memory_bound("reverse", 5, 1, 10) == pytest.approx(chance(10))
    assert no_memory_bound("associative_retrieval", 3, 1, 36) == pytest.approx(chance(36))
    # reverse with 4 symbols in segments of 5: s0 s1 s2 s3 <gen> | s3' s2' s1' s0': the first answer (predicted at
    # <gen>, segment 0) is certain, the rest read segment 1, which holds no source symbol
    assert no_memory_bound("reverse", 4, 5, 10) == pytest.approx(100 * (1 + 3 / 10) / 4)


def test_recognise_the_generator_of_training_samples():
    for task, kw in [("copy", {"src_len": 5}), ("reverse", {"src_len": 5}),
                     ("associative_retrieval", {"num_pairs": 3})]:
        rng = random.Random(0)
        samples = [line(*GENERATORS[task](rng, **kw)).split() for _ in range(20)]
        assert recognise(samples) == task
    copy = line(*GENERATORS["copy"](random.Random(1), src_len=3)).split()
    rev = line(*GENERATORS["reverse"](random.Random(2), src_len=3)).split()
    assert recognise([copy, rev]) is None  # mixed
    assert recognise([["a", "b", "<gen>", "c"]]) is None


def test_extrapolation_plot_marks_chance_and_trained_length():
    rows = [{"segments": s, "acc": 90.0, "em": 50.0, "no_memory_bound": 19.0} for s in (3, 6, 12)]
    fig = plot(rows, "copy", chance(10), 10, 3, 11, 31)
    ax = fig.axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert "chance: uniform over 10 symbols (10%)" in labels and "trained length (3 segments, 31 tokens)" in labels
    assert "no-memory bound (token accuracy)" in labels
    chance_line = next(h for h, lab in zip(*ax.get_legend_handles_labels()) if lab.startswith("chance"))
    assert list(chance_line.get_ydata()) == [10.0, 10.0]
    trained = next(h for h, lab in zip(*ax.get_legend_handles_labels()) if lab.startswith("trained"))
    assert list(trained.get_xdata()) == [3, 3]


def test_attention_figure_has_a_colour_bar_and_marked_blocks():
    M, T, W, C = 2, 5, 2, 3  # cache, read memory, segment, write memory
    K, N = C + M + T + W, M + T + W
    w = np.random.default_rng(0).dirichlet(np.ones(K), size=(2, N))  # H x N x K, rows sum to 1
    labels = [f"c{i}" for i in range(C)] + ["r0", "r1"] + list("abcde") + ["w0", "w1"]
    blocks = [("cache", 0, C), ("read", C, C + M), ("segment", C + M, C + M + T), ("write", C + M + T, K)]
    fig = attention_figure(w, labels, blocks, "title")
    heads, bar = fig.axes[:2], fig.axes[2]
    assert len(fig.axes) == 3 and bar.get_ylabel() == "attention weight"
    assert heads[0].images[0].get_clim() == (0.0, 1.0)  # one scale for every head and plot
    assert [t.get_text() for t in heads[0].get_xticklabels()] == labels
    assert [t.get_text() for t in heads[0].get_yticklabels()] == labels[C:]  # queries: no cache rows
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["XL cache (c*)", "read memory (r*)", "segment tokens", "write memory (w*)"]
    # separators at the block borders: columns 3, 5, 10 and rows 2, 7 (the query blocks)
    xs = sorted(ln.get_xdata()[0] for ln in heads[0].lines if ln.get_xdata()[0] == ln.get_xdata()[1])
    ys = sorted(ln.get_ydata()[0] for ln in heads[0].lines if ln.get_ydata()[0] == ln.get_ydata()[1])
    assert xs == [2.5, 4.5, 9.5] and ys == [1.5, 6.5]


def _help(main, argv, capsys, flat=True):
    """--help as printed; flat: whitespace runs as one space (argparse wraps to the terminal's width)."""
    with pytest.raises(SystemExit):
        main(argv)
    out = capsys.readouterr().out
    return " ".join(out.split()) if flat else out


def test_help_shows_defaults_and_the_shell_continuation(capsys):
    top = _help(data_cli.main, ["--help"], capsys, flat=False)
    # the fairseq-preprocess example is one shell command over two lines, not joined with a run of spaces
    assert "--validpref DIR/valid.txt \\\n        --testpref DIR/test.txt" in top
    assert "valid.txt   " not in top
    copy = _help(data_cli.main, ["copy", "--help"], capsys)
    for default in ["(default: 24)", "(default: 10)", "(default: 100000)", "(default: 1)"]:
        assert default in copy
    assert "(default: None)" not in copy
    assert "(default: 4000)" in _help(data_cli.main, ["recall", "--help"], capsys)
    assert "(default: 10000)" in _help(data_cli.main, ["memorization", "--help"], capsys)
    d = _help(demo.main, ["--help"], capsys)
    for default in ["(default: outputs/demo)", "(default: 2000)", "(default: 3)", "(default: 20000)"]:
        assert default in d
