"""Benchmark scripts run in --quick mode and write well-formed JSON (figures are never asserted here; agreements
between two runs of the same script are, e.g. one ARMT checkpoint streamed in both schedules).

Marked `long` (about 4.5 minutes on this 2-core machine): not in `make test`; `make test-long` runs them, and CI
runs it after `make test`."""

import json
import subprocess
import sys

import pytest

from helpers import REPO

pytestmark = pytest.mark.long


def test_deep_unroll_memory_quick(tmp_path):
    out = tmp_path / "r.json"
    subprocess.run([sys.executable, "benchmarks/deep_unroll_memory.py", "--quick", "--out", str(out)], cwd=REPO,
                   check=True, capture_output=True, timeout=300)
    res = json.loads(out.read_text())
    assert {(r["K"], r["checkpoint_segments"]) for r in res["rows"]} == {(1, False), (2, False), (1, True),
                                                                         (2, True)}
    assert all(r["sec_per_segment"] > 0 and r["peak_mb"] >= 0 for r in res["rows"])
    assert all(r["peak_mb_default_malloc"] >= 0 for r in res["rows"])
    assert set(res["summary"]) == {"memory_ratio_kmax_vs_k1_with_ckpt", "memory_ratio_kmax_vs_k1_without_ckpt",
                                   "memory_ratio_kmax_vs_k1_with_ckpt_default_malloc",
                                   "time_per_segment_ratio_kmax_vs_k1_with_ckpt"}


def test_throughput_quick(tmp_path):
    out = tmp_path / "t.json"
    subprocess.run([sys.executable, "benchmarks/throughput.py", "--quick", "--out", str(out)], cwd=REPO,
                   check=True, capture_output=True, timeout=300)
    res = json.loads(out.read_text())
    assert [r["model"] for r in res["rows"]] == ["no_memory", "rmt_K0", "rmt_K2", "transformer_xl",
                                                 "fairseq_transformer_lm"]
    assert res["rows"][0]["ratio_to_no_memory"] == 1.0
    assert all(r["tokens_per_s"] > 0 and r["model_flops_fraction_of_gemm"] > 0 for r in res["rows"])


def test_long_stream_quick_no_memory_growth_is_reported(tmp_path):
    out = tmp_path / "l.json"
    subprocess.run([sys.executable, "benchmarks/long_stream.py", "--quick", "--out", str(out)], cwd=REPO,
                   check=True, capture_output=True, timeout=300)
    res = json.loads(out.read_text())
    assert [r["tokens"] for r in res["rows"]] == [16000, 128000]
    assert set(res["summary"]) == {"time_per_token_longest_vs_16k", "peak_rss_longest_vs_16k"}


def test_char_lm_quick_runs_the_real_clis(tmp_path):
    """Quick mode on a generated text: fairseq-preprocess, fairseq-train and fairseq-eval-lm per configuration."""
    import random

    rng = random.Random(0)
    words = ["thou", "art", "my", "lord", "and", "the", "king", "shall", "not", "be", "so", "good"]
    text = "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) for _ in range(3000))
    (tmp_path / "input.txt").write_text(text)
    out = tmp_path / "c.json"
    subprocess.run([sys.executable, "benchmarks/char_lm.py", "--quick", "--data", str(tmp_path / "input.txt"),
                    "--out", str(out), "--png", str(tmp_path / "c.png"), "--workdir", str(tmp_path / "w")],
                   cwd=REPO, check=True, capture_output=True, timeout=300)
    res = json.loads(out.read_text())
    assert [r["config"] for r in res["rows"]] == ["none", "xl40", "rmt5_k1"]
    n = min(len(text), 40000)  # --quick: the first 40K characters
    assert res["setup"]["characters"] == {"train": int(0.9 * n), "valid": int(0.95 * n) - int(0.9 * n),
                                          "test": n - int(0.95 * n)}
    for r in res["rows"]:
        assert 0 < r["test_bpc"] < 10 and r["valid_curve"] and r["valid_curve"][-1][0] == res["setup"]["max_update"]
    assert (tmp_path / "c.png").stat().st_size > 0

    # --merge: another setup is refused before anything trains, the results untouched; the same setup adds a row
    base = [sys.executable, "benchmarks/char_lm.py", "--quick", "--data", str(tmp_path / "input.txt"), "--out",
            str(out), "--workdir", str(tmp_path / "w2"), "--configs", "armt5_k1", "--merge"]
    before = out.read_text()
    p = subprocess.run(base + ["--max-update", "8"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "error: --merge:" in p.stderr and "max_update: 6 vs 8" in p.stderr
    assert out.read_text() == before and not (tmp_path / "w2" / "train_armt5_k1.log").exists()
    subprocess.run(base, cwd=REPO, check=True, capture_output=True, timeout=300)
    merged = json.loads(out.read_text())
    assert [r["config"] for r in merged["rows"]] == ["none", "xl40", "rmt5_k1", "armt5_k1"]
    assert merged["rows"][:3] == res["rows"] and "--associative-memory" in merged["rows"][3]["flags"]
    assert merged["rows"][3]["provenance"]["command"] and merged["provenance"] == res["provenance"]


def test_memorization_quick_runs_the_real_clis(tmp_path):
    """rmt-data memorization, fairseq-train (curriculum; RMT, ARMT and no memory), rmt-extrapolate-classify of
    both memory models at the same lengths."""
    out = tmp_path / "m.json"
    subprocess.run([sys.executable, "benchmarks/memorization.py", "--quick", "--out", str(out), "--workdir",
                    str(tmp_path / "w"), "--png", str(tmp_path / "m.png")], cwd=REPO, check=True, capture_output=True,
                   timeout=600)
    res = json.loads(out.read_text())
    assert set(res["training"]) == {"rmt", "armt", "no_memory"}
    assert "--associative-memory" in res["training"]["armt"]["flags"]
    n = res["setup"]["max_segments"]
    assert res["extrapolation"][0]["segments"] == n and res["extrapolation"][-1]["tokens"] >= 2000
    assert [r["segments"] for r in res["armt_extrapolation"]] == [r["segments"] for r in res["extrapolation"]]
    assert all(0 <= r["accuracy"] <= 100 and r["rss_mb"] > 0 for r in res["extrapolation"] + res["armt_extrapolation"])
    assert len(res["no_memory_baseline"]) == 1
    # the same ARMT checkpoint in both schedules: the same predictions, so the same accuracy at every length run
    seq = {r["segments"]: r["accuracy"] for r in res["armt_sequential_extrapolation"]}
    assert seq and all(r["accuracy"] == seq[r["segments"]] for r in res["armt_extrapolation"] if r["segments"] in seq)
    assert (tmp_path / "m.png").stat().st_size > 0


def test_memorization_ablation_trains_once_and_scores_both_splits(tmp_path):
    """memorization_ablation.py through the real CLIs: the recipe's flags reach fairseq-train (its summary line),
    one training per seed is scored on valid and test at N, 2N, 8N, 32N and the longest length, rows accumulate."""
    out = tmp_path / "a.json"
    base = [sys.executable, "benchmarks/memorization_ablation.py", "--max-update", "20", "--max-segments", "2",
            "--num-docs", "4", "--max-tokens", "2000", "--out", str(out), "--png", str(tmp_path / "a.png"),
            "--workdir", str(tmp_path / "w")]
    subprocess.run(base + ["--recipes", "rmt_gated_hard_mix", "--subset", "valid,test"], cwd=REPO, check=True,
                   capture_output=True, timeout=600)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["recipe"], r["subset"], r["seed"]) for r in rows] == [("rmt_gated_hard_mix", "valid", 1),
                                                                    ("rmt_gated_hard_mix", "test", 1)]
    log = (tmp_path / "w" / "fact_memorization_rmt_gated_hard_mix_s1" / "train.log").read_text()
    assert "--memory-layout gated_hard" in log and "--curriculum-mix: training documents of 1 to" in log
    n = rows[0]["curriculum_stage_reached"]
    assert [e["segments"] for e in rows[0]["rows"]] == [n, 2 * n, 8 * n, 32 * n, 63]  # 63 x 32 >= 2000 tokens
    assert all(0 <= e["accuracy"] <= 100 for r in rows for e in r["rows"])
    assert 0 <= rows[0]["gate_closed_share"] <= 1 and rows[0]["gate_closed_share"] == rows[1]["gate_closed_share"]
    p = subprocess.run(base + ["--recipes", "nope"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "error: --recipes: unknown recipe 'nope'" in p.stderr
    assert len(json.loads(out.read_text())["rows"]) == 2  # a refused run leaves the results as they were


def test_scaleout_quick(tmp_path):
    out = tmp_path / "s.json"
    subprocess.run([sys.executable, "benchmarks/scaleout.py", "--quick", "--out", str(out)], cwd=REPO,
                   check=True, capture_output=True, timeout=600)
    res = json.loads(out.read_text())
    assert [r["combination"] for r in res["rows"]] == ["fairseq-train, 1 process",
                                                       "fairseq-train, 2 ranks, pytorch_ddp"]
    assert res["rows"][0]["ratio_to_one_process"] == 1.0
    assert all(r["tokens_per_s"] > 0 and r["peak_rss_mb_largest_process"] > 0 for r in res["rows"])


def test_associative_capacity_quick_runs_the_real_clis(tmp_path):
    """rmt-data (capacity layout), fairseq-preprocess, fairseq-train and fairseq-validate per N and model."""
    out = tmp_path / "a.json"
    subprocess.run([sys.executable, "benchmarks/associative_capacity.py", "--quick", "--out", str(out), "--workdir",
                    str(tmp_path / "w")], cwd=REPO, check=True, capture_output=True, timeout=600)
    res = json.loads(out.read_text())
    assert [(r["num_pairs"], r["model"]) for r in res["rows"]] == [(2, "rmt"), (2, "armt"), (3, "rmt"), (3, "armt")]
    assert res["setup"]["archs"] == {"rmt": "rmt_tiny", "armt": "armt_tiny"} and res["setup"]["mem_tokens"] == 4
    # the curriculum: the second N starts from the same model's checkpoint at the first
    assert [r["started_from"] for r in res["rows"]] == ["scratch", "scratch", "rmt at N=2", "armt at N=2"]
    for r in res["rows"]:  # N pairs one to a segment of k v |, then the query: N + 1 segments of 3 tokens
        assert (r["segments"], r["segment_len"]) == (r["num_pairs"] + 1, 3)
        assert 0 <= r["test_exact_match"] <= 100 and r["valid_curve"][-1]["update"] == res["setup"]["max_update"]
    assert (tmp_path / "a.png").stat().st_size > 0 and res["provenance"]["command"].startswith("benchmarks/")


def test_diagonal_batching_quick(tmp_path):
    out = tmp_path / "d.json"
    subprocess.run([sys.executable, "benchmarks/diagonal_batching.py", "--quick", "--out", str(out)], cwd=REPO,
                   check=True, capture_output=True, text=True, timeout=900)
    res = json.loads(out.read_text())
    assert [r["tokens"] for r in res["summary"]] == [4096, 8192]
    assert {r["schedule"] for r in res["rows"]} == {"sequential", "diagonal"}
    # the two schedules score the same stream: their summed NLL agrees (rounding only)
    assert all(r["nll_relative_difference"] < 1e-5 for r in res["summary"])
    assert (tmp_path / "d.png").stat().st_size > 0 and res["provenance"]["command"].startswith("benchmarks/")
