"""ARMT (--arch armt_tiny: associative memory per layer, the diagonal inference schedule) the way users run it,
through the real CLIs on the recall corpus (T = 8, a few updates):

- fairseq-eval-lm, fairseq-validate and fairseq-train's own validation give one loss for one checkpoint. The
  diagonal schedule runs where a call holds several segments (--eval-segments-per-batch > 1; the hub's score() of
  a long text): under fairseq-eval-lm --model-overrides "{'inference_schedule': ...}" both schedules score every
  token alike and the diagonal one really runs the batched layer calls.
  (Every door at once, generation across segment boundaries included: family `armt` of tests/e2e/test_agreement.py.)
- fairseq-train with 2 ranks logs one process's losses and validation and saves both ranks' associative states in
  rank order; rmt-deepspeed-train under the deepspeed launcher (ZeRO-2; ZeRO-3 partitioning every weight, with
  segment and activation checkpointing) does the same, and its checkpoint validates as the reference.
- SIGKILL after a checkpoint, then the same command (block and sliding BPTT): the checkpoint holds the associative
  state (the streams' and the sliding window's), and the resumed run reproduces the uninterrupted one bitwise.
- --bf16 trains near fp32 with the associative state kept in fp32 (in bf16 only with --associative-state-dtype
  model); eval-lm --bf16 of that checkpoint scores near fp32.
- Bad ARMT flags: one `error:` line naming flag and value, exit 2, nothing written.
- A non-finite associative state stops training (or is skipped with --on-nonfinite skip) as a non-finite memory.

References are single-process fairseq-train runs with SGD, as in tests/distributed and tests/deepspeed: Adam's first
steps would turn float-level differences of another summation order into full-size ones."""

import math
import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from helpers import BIN, REPO, THREADS, cli, diagonal_calls, train_losses

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(TESTS, "deepspeed"))

T = 8
TOL = 2e-4  # losses are printed to 4 decimals; two ranks sum in another order than one process
UPDATES = 8
F = 2 * 3 * 32  # armt_tiny's DPFP feature rows: 2 x nu 3 x d_mem 32
C = 64
ARMT = ["--user-dir", "user_dir", "--task", "rmt_lm", "--arch", "armt_tiny", "--criterion", "rmt_cross_entropy",
        "--tokens-per-sample", T, "--cpu", "--num-workers", 0, "--seed", 1, "--log-format", "simple",
        "--log-interval", 1]
SGD = [*ARMT, "--optimizer", "sgd", "--lr", 0.5, "--bptt-unroll", 1, "--max-update", UPDATES, "--no-epoch-checkpoints"]
# validation once training stops, in batches of 4 segments per stream: the diagonal schedule's case
VALID = ["--eval-segments-per-batch", 4]


def _train_state(path):
    return torch.load(path, map_location="cpu", weights_only=False)["extra_state"]["RMTLMTask"]["train_state"]


def _log(p):
    return p.stdout + p.stderr


def _valid(log, subset="valid"):
    return [float(x) for x in re.findall(rf"valid on '{subset}' subset \| loss ([0-9.]+)", log)]


@pytest.fixture(scope="module")
def reference(recall_data, tmp_path_factory):
    """One process reading all 8 streams: per-update losses, its validation, the checkpoint."""
    save = tmp_path_factory.mktemp("armt_ref")
    log = _log(cli("fairseq-train", recall_data, *SGD, *VALID, "--batch-size", 8, "--save-dir", save))
    losses, valid = train_losses(log), _valid(log)
    assert sorted(losses) == list(range(1, UPDATES + 1)) and len(valid) == 1, log[-3000:]
    return losses, valid[0], save / "checkpoint_last.pt"


def test_the_reference_carries_a_nonzero_associative_state(reference):
    """The premise of every comparison below: W_V has left zero, so the state read by the next segment is not."""
    assoc = _train_state(reference[2])["assoc"]
    assert [tuple(t.shape) for t in assoc] == [(8, F, C), (8, F), (8, F, C), (8, F)]
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in assoc)
    assert min(assoc[0].abs().max().item(), assoc[2].abs().max().item()) > 1e-2


# ---- one checkpoint, every evaluation tool, both schedules ---------------------------------------------------------

# a fairseq CLI's own cli_main, with RMTDecoder.diagonal_layers counted (the call itself is unchanged)
COUNTED = """
import atexit, importlib, sys
from rmt_fairseq.models.rmt_lm import RMTDecoder
calls, layers = [0], RMTDecoder.diagonal_layers
def counted(self, *a, **kw):
    calls[0] += 1
    return layers(self, *a, **kw)
RMTDecoder.diagonal_layers = counted
atexit.register(lambda: print(f"diagonal_layers calls: {calls[0]}", file=sys.__stderr__))
name = sys.argv.pop(1)
sys.argv[0] = name
importlib.import_module({"fairseq-eval-lm": "fairseq_cli.eval_lm", "fairseq-validate": "fairseq_cli.validate"}[name]
                        ).cli_main()
"""


def _tool(name, *args, counted=False):
    """(output, number of diagonal_layers calls or None)."""
    if not counted:
        return _log(cli(name, *args)), None
    p = subprocess.run([sys.executable, "-c", COUNTED, name, *map(str, args)], cwd=REPO, capture_output=True,
                       text=True, timeout=600, env=dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS=THREADS))
    assert p.returncode == 0, _log(p)[-3000:]
    return _log(p), int(re.search(r"diagonal_layers calls: (\d+)", _log(p)).group(1))


def _eval_lm(data, path, *extra, counted=False):
    out, calls = _tool("fairseq-eval-lm", data, "--user-dir", "user_dir", "--task", "rmt_lm", "--path", path,
                       "--batch-size", 8, "--gen-subset", "valid", "--cpu", "--num-workers", 0, *extra, counted=counted)
    loss = float(re.search(r"Loss \(base 2\): ([0-9.]+)", out).group(1))
    lines = re.findall(r"fairseq_cli\.eval_lm[ |:]+\d+ (.*)$", out, re.M)  # --output-word-probs
    scores = [float(x) for line in lines for x in re.findall(r" \[(-?[0-9.]+)\]", " " + line)]  # nats, 6 dp
    return loss, scores, calls, out


def _validate(data, path, subset, *extra, counted=False):
    out, calls = _tool("fairseq-validate", data, "--user-dir", "user_dir", "--task", "rmt_lm", "--path", path,
                       "--batch-size", 8, "--valid-subset", subset, "--cpu", "--num-workers", 0, *extra,
                       counted=counted)
    assert "8 streams x" in out, out[-2000:]
    return float(re.search(rf"valid on '{subset}' subset \| loss ([0-9.]+)", out).group(1)), calls


def _schedule(name):
    return ["--model-overrides", f"{{'inference_schedule': '{name}'}}"]


def test_eval_lm_validate_and_training_validation_give_one_loss(recall_data, reference):
    """eval-lm and fairseq-validate with one segment per batch (the default), fairseq-train's validation with 4
    under the diagonal schedule: one loss, printed to 4 decimals by each."""
    loss, _, _, out = _eval_lm(recall_data, reference[2])
    assert "8 streams x" in out, out[-2000:]
    valid, _ = _validate(recall_data, reference[2], "valid")
    assert abs(loss - valid) <= 1e-4 + 5e-5 and abs(loss - reference[1]) <= 1e-4 + 5e-5, (loss, valid, reference[1])


def test_eval_lm_schedules_agree_and_diagonal_runs_batched(recall_data, reference):
    """Every token of the valid split (8 streams of 18 segments, 6 per batch) scored alike under the sequential
    and the diagonal schedule; the diagonal run really takes the diagonal path (its batched layer calls)."""
    runs = {name: _eval_lm(recall_data, reference[2], "--output-word-probs", "--eval-segments-per-batch", 6,
                           *_schedule(name), counted=True)
            for name in ("sequential", "diagonal")}
    (_, seq, seq_calls, out), (_, diag, diag_calls, _) = runs["sequential"], runs["diagonal"]
    assert len(seq) == len(diag) > 1000, out[-2000:]
    total = sum(seq)
    assert abs(sum(diag) - total) <= 1e-5 * abs(total)
    assert max(abs(a - b) for a, b in zip(seq, diag)) <= 1e-5 + 1e-6  # printed to 6 decimals
    assert seq_calls == 0
    assert diag_calls > 0, "fairseq-eval-lm never ran the diagonal schedule"


def test_hub_score_of_a_long_text_agrees_under_both_schedules(recall_data, reference):
    """The README's way to score a long text from Python (the hub's score(): one forward over all its segments):
    the diagonal schedule really runs there and equals the sequential one."""
    from fairseq import hub_utils

    import user_dir  # noqa: F401

    raw = os.path.join(os.path.dirname(recall_data), "raw", "valid.txt")
    text = " ".join(open(raw).read().split()[:200])  # 25 segments of 8
    scores = {}
    for schedule in ("sequential", "diagonal"):
        hub = hub_utils.from_pretrained(str(reference[2].parent), "checkpoint_last.pt", data_name_or_path=recall_data,
                                        inference_schedule=schedule)
        lm = hub_utils.GeneratorHubInterface(hub["args"], hub["task"], hub["models"]).eval()
        decoder = lm.models[0].decoder
        assert decoder.inference_schedule == schedule and decoder.diagonal_ok
        with diagonal_calls(decoder) as runs:
            scores[schedule] = lm.score(text)["positional_scores"]
        assert bool(runs) == (schedule == "diagonal")  # the diagonal path ran, and only there
    assert scores["sequential"].numel() == 200
    assert torch.allclose(scores["diagonal"], scores["sequential"], rtol=1e-5, atol=1e-5)


# ---- several ranks ---------------------------------------------------------------------------------------------------


def test_two_ranks_log_one_process_losses_and_validation_and_save_both_ranks_states(recall_data, reference,
                                                                                      tmp_path):
    """fairseq-train --distributed-world-size 2 (the default --ddp-backend pytorch_ddp, which refuses a parameter
    without a gradient: W_Q is used at a stream's first segment, where the state is empty)."""
    p = cli("fairseq-train", recall_data, *SGD, *VALID, "--batch-size", 4, "--distributed-world-size", 2,
            "--save-dir", tmp_path)
    log = _log(p)
    assert "initialized host" in log and "as rank 1" in log, log[-3000:]  # really two processes
    got, ref = train_losses(log), reference[0]
    assert sorted(got) == list(range(1, UPDATES + 1)), log[-3000:]
    assert all(abs(got[u] - ref[u]) <= TOL for u in got), (got, ref)
    assert _valid(log) == pytest.approx([reference[1]], abs=TOL)  # each rank validates its streams, diagonally
    # rank 0's checkpoint holds both ranks' 4 streams in rank order: the one process's 8 streams
    two, one = _train_state(tmp_path / "checkpoint_last.pt")["assoc"], _train_state(reference[2])["assoc"]
    assert [t.shape for t in two] == [t.shape for t in one]
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-4) for a, b in zip(two, one))
    assert not torch.equal(two[0][:4], two[0][4:])


@pytest.mark.deepspeed
@pytest.mark.parametrize("stage,extra", [(2, []), (3, ["--checkpoint-segments", "--checkpoint-activations"])],
                         ids=["zero2", "zero3-partitioned+checkpointing"])
def test_deepspeed_two_ranks_match_fairseq_train_and_their_checkpoint_validates(recall_data, reference, stage, extra,
                                                                                tmp_path):
    """The validation (4 segments per batch) runs the diagonal schedule, which reads every layer's weights at once:
    under ZeRO-3 with every weight partitioned too."""
    from test_deepspeed_train import deepspeed

    config = f"ds_configs/zero{stage}.json"
    if stage == 3:  # every weight really partitioned (the shipped threshold keeps a tiny model whole)
        (tmp_path / "partition_all.json").write_text('{"zero_optimization": {"stage3_param_persistence_threshold": 0}}')
        config += f",{tmp_path / 'partition_all.json'}"
    save = tmp_path / "ds"
    out = deepspeed(recall_data, *SGD, *VALID, *extra, "--batch-size", 4, "--save-dir", save,
                    "--deepspeed-config", config)
    got, ref = train_losses(out), reference[0]
    assert sorted(got) == list(range(1, UPDATES + 1)), out[-3000:]
    assert all(abs(got[u] - ref[u]) <= TOL for u in got), (got, ref)
    assert _valid(out) == pytest.approx([reference[1]], abs=TOL), out[-3000:]

    # rank 0's checkpoint_last.pt is a fairseq checkpoint: the model (gathered under ZeRO-3) and both ranks' streams
    assoc = _train_state(save / "checkpoint_last.pt")["assoc"]
    assert all(torch.allclose(a, b, rtol=1e-3, atol=1e-4) for a, b in zip(assoc, _train_state(reference[2])["assoc"]))
    valid, _ = _validate(recall_data, save / "checkpoint_last.pt", "valid")  # the reference's: see the first test
    assert valid == pytest.approx(reference[1], abs=TOL)


# ---- kill and resume -------------------------------------------------------------------------------------------------

RESUME = [*ARMT, "--batch-size", 4, "--optimizer", "adam", "--lr", "2e-3", "--dropout", 0.1, "--disable-validation",
          "--no-epoch-checkpoints", "--save-interval-updates", 10, "--max-update", 20]
BPTT = {"block": ["--bptt-unroll", 1], "sliding": ["--bptt-unroll", 2, "--bptt-mode", "sliding"]}


def _assert_same_checkpoint(a, b):
    sa, sb = (torch.load(p, map_location="cpu", weights_only=False) for p in (a, b))
    assert sa["model"].keys() == sb["model"].keys()
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"]), "weights differ"
    oa, ob = sa["last_optimizer_state"]["state"], sb["last_optimizer_state"]["state"]
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k][n], ob[k][n]) for k in oa for n in oa[k]
                                          if torch.is_tensor(oa[k][n]))
    ta, tb = sa["extra_state"]["RMTLMTask"]["train_state"], sb["extra_state"]["RMTLMTask"]["train_state"]
    assert all(torch.equal(x, y) for x, y in zip(ta["assoc"], tb["assoc"]))
    for wa, wb in zip(ta["window"], tb["window"], strict=True):
        assert torch.equal(wa["tokens"], wb["tokens"]) and all(torch.equal(x, y) for x, y in zip(wa["assoc"],
                                                                                                  wb["assoc"]))
    assert sa["extra_state"]["train_iterator"] == sb["extra_state"]["train_iterator"]


@pytest.mark.long  # a SIGKILL resume, as tests/reliability/test_kill_resume.py: `make test-long`
@pytest.mark.parametrize("mode", list(BPTT))
def test_sigkill_after_a_checkpoint_then_resume_reproduces_the_uninterrupted_run(recall_data, tmp_path, mode):
    """Adam, dropout 0.1; block BPTT (K = 1), and sliding (K = 2), whose window segments carry associative states."""
    args = [recall_data, *RESUME, *BPTT[mode]]
    full = cli("fairseq-train", *args, "--save-dir", tmp_path / "full")
    ref = train_losses(_log(full))
    assert sorted(ref) == list(range(1, 21))

    cmd = [os.path.join(BIN, "fairseq-train"), *map(str, [*args, "--save-dir", tmp_path / "b"])]
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS=THREADS, PYTHONUNBUFFERED="1")
    p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in p.stdout:
        lines.append(line)
        if re.search(r"Saved checkpoint .*@ 10 updates", line):
            time.sleep(0.05)  # a few more updates may run, unsaved
            p.send_signal(signal.SIGKILL)
            break
    lines.extend(p.stdout.read().splitlines(True))
    assert p.wait(timeout=60) == -signal.SIGKILL, "".join(lines)[-3000:]

    state = _train_state(tmp_path / "b" / "checkpoint_1_10.pt")
    assert [tuple(t.shape) for t in state["assoc"]] == [(4, F, C), (4, F), (4, F, C), (4, F)]
    assert state["assoc"][0].abs().max() > 0
    if mode == "sliding":
        assert len(state["window"]) == 2 and all(w["assoc"] is not None for w in state["window"])

    resumed = cli("fairseq-train", *args, "--save-dir", tmp_path / "b")
    got = train_losses(_log(resumed))
    assert sorted(got) == list(range(11, 21)), _log(resumed)[-3000:]
    assert all(got[u] == ref[u] for u in got), (got, ref)
    _assert_same_checkpoint(tmp_path / "full" / "checkpoint_last.pt", tmp_path / "b" / "checkpoint_last.pt")


# ---- bfloat16 --------------------------------------------------------------------------------------------------------

BF16_FIRST, BF16_LATER, EVAL_BF16 = 0.02, 0.1, 0.02  # as tests/e2e/test_mixed_precision.py


def test_bf16_trains_near_fp32_keeps_the_associative_state_in_fp32_and_evaluates(recall_data, reference, tmp_path):
    p = cli("fairseq-train", recall_data, *SGD, "--batch-size", 8, "--bf16", "--disable-validation", "--save-dir",
            tmp_path / "bf16")
    assert "bfloat16 on CPU" in _log(p)
    got, ref = train_losses(p.stdout), reference[0]
    assert sorted(got) == sorted(ref) and all(math.isfinite(v) for v in got.values())
    assert abs(got[1] - ref[1]) <= BF16_FIRST and all(abs(got[u] - ref[u]) <= BF16_LATER for u in got), (got, ref)
    # fairseq writes the weights in fp32 (its move_to_cpu), the task's state as it was held
    path = tmp_path / "bf16" / "checkpoint_last.pt"
    assert {t.dtype for t in _train_state(path)["assoc"]} == {torch.float32}
    # the switch that keeps it in the model's dtype does keep it in bf16: the check above can tell
    cli("fairseq-train", recall_data, *SGD, "--max-update", 2, "--batch-size", 8, "--bf16", "--associative-state-dtype",
        "model", "--disable-validation", "--save-dir", tmp_path / "model_dtype")
    assert {t.dtype for t in _train_state(tmp_path / "model_dtype" / "checkpoint_last.pt")["assoc"]} == {
        torch.bfloat16}

    fp32_loss, _, _, fp32_out = _eval_lm(recall_data, path)
    bf16_loss, _, _, bf16_out = _eval_lm(recall_data, path, "--bf16")
    assert "inference in float32" in fp32_out and "inference in bfloat16" in bf16_out
    tokens = [re.search(r"Evaluated ([0-9,]+) tokens", o).group(1) for o in (fp32_out, bf16_out)]
    assert tokens[0] == tokens[1] and abs(bf16_loss - fp32_loss) <= EVAL_BF16, (bf16_loss, fp32_loss)


# ---- bad flags -------------------------------------------------------------------------------------------------------

BAD = {
    "d_mem 0": (["--d-mem", 0], ["--d-mem", "got 0"]),
    "dpfp_nu 0": (["--dpfp-nu", 0], ["--dpfp-nu", "got 0"]),
    "no memory tokens": (["--mem-tokens", 0], ["--associative-memory", "--mem-tokens", "got 0"]),
    "mt layout": (["--memory-layout", "mt"], ["--associative-memory", "--memory-layout mt"]),
}


@pytest.fixture(scope="module")
def bad_runs(recall_data, tmp_path_factory):
    """Every case at once (the processes mostly import torch and fairseq): name -> (process, save dir)."""
    root = tmp_path_factory.mktemp("armt_bad")

    def run(name):
        save = root / name.replace(" ", "_")
        return cli("fairseq-train", recall_data, *SGD, "--batch-size", 4, "--save-dir", save, *BAD[name][0],
                   check=False), save

    with ThreadPoolExecutor(2) as ex:
        return dict(zip(BAD, ex.map(run, BAD)))


@pytest.mark.parametrize("name", list(BAD))
def test_a_bad_armt_flag_is_one_error_line_and_nothing_is_written(bad_runs, name):
    p, save = bad_runs[name]
    errors = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.strip().splitlines()[-1] == errors[0]
    assert all(word in errors[0] for word in BAD[name][1]), errors[0]
    assert not save.exists() or not any(save.iterdir())


# ---- non-finite associative state ----------------------------------------------------------------------------------

NONFINITE = [*ARMT, "--batch-size", 4, "--optimizer", "adam", "--lr", "2e-3", "--bptt-unroll", 1,
             "--disable-validation", "--no-epoch-checkpoints", "--save-interval-updates", 2]


def _train_with_fault(data, save, fault, *extra):
    env = dict(os.environ, OMP_NUM_THREADS=THREADS, RMT_FAULT=fault,
               PYTHONPATH=os.pathsep.join([REPO, os.path.join(TESTS, "faults"), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-c", "import rmt_faults; rmt_faults.main('fairseq-train')",
           *map(str, [data, *NONFINITE, "--save-dir", save, *extra])]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_a_nonfinite_associative_state_stops_training_and_keeps_the_checkpoint(recall_data, tmp_path):
    # K = 1: two segments per update, so the 6th training segment is update 3's second
    p = _train_with_fault(recall_data, tmp_path, "nan_assoc:6", "--max-update", 6)
    assert p.returncode == 1, _log(p)[-3000:]
    assert p.stderr.strip().splitlines()[-1].startswith(
        "error: non-finite memory state at update 3, segment 2 of 2 in the batch (segment 6 of the streams); "
        "stopped"), p.stderr[-2000:]
    last = torch.load(tmp_path / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert last["optimizer_history"][-1]["num_updates"] == 2  # the checkpoint written before the failure
    assoc = last["extra_state"]["RMTLMTask"]["train_state"]["assoc"]
    assert assoc is not None and all(torch.isfinite(t).all() for t in assoc)


def test_skip_mode_skips_the_batch_and_restores_the_associative_state(recall_data, tmp_path):
    """Only the faulty batch is skipped: had its NaN state been kept, the next batches would read it."""
    p = _train_with_fault(recall_data, tmp_path, "nan_assoc:6", "--max-update", 6, "--on-nonfinite", "skip")
    log = _log(p)
    assert p.returncode == 0, log[-3000:]
    assert ("non-finite memory state at update 3, segment 2 of 2 in the batch (segment 6 of the streams); "
            "batch skipped") in log
    assert log.count("batch skipped") == 1, log[-3000:]
    assert all(math.isfinite(v) for v in train_losses(log).values())
    last = torch.load(tmp_path / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert last["optimizer_history"][-1]["num_updates"] == 6
    assert all(torch.isfinite(v).all() for v in last["model"].values())
    assert all(torch.isfinite(t).all() for t in last["extra_state"]["RMTLMTask"]["train_state"]["assoc"])
