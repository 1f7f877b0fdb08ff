"""Fault injection for the reliability tests. `python -c "import rmt_faults; rmt_faults.main('fairseq-train')"`
runs fairseq's own cli_main after installing the fault RMT_FAULT names (the process is otherwise fairseq-train
exactly; the kills are real SIGKILLs of that process):

  kill_in_save:N   the Nth torch.save into a file (a checkpoint write): half its bytes reach the file, SIGKILL
  kill_in_copy:N   the Nth file copy (fairseq's checkpoint_last.pt copy): half the bytes, then SIGKILL
  nan:N            the Nth segment forward in training mode returns NaN hidden states (so the loss is NaN)
  nan_memory:N     the Nth segment forward in training mode writes a NaN memory
  nan_assoc:N      the Nth segment forward in training mode writes a NaN associative state (ARMT: layer 0's A)
"""

import io
import os
import signal
import sys


def _kill_after_half(data: bytes, f) -> None:
    f.write(data[: len(data) // 2])
    f.flush()
    os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)


def install(fault: str) -> None:
    kind, n = fault.rsplit(":", 1)
    n, count = int(n), [0]
    if kind == "kill_in_save":
        import torch

        save = torch.save

        def torch_save(obj, f, *a, **kw):
            if not isinstance(f, (str, os.PathLike)):
                count[0] += 1
                if count[0] == n:
                    buf = io.BytesIO()
                    save(obj, buf, *a, **kw)
                    _kill_after_half(buf.getvalue(), f)
            return save(obj, f, *a, **kw)

        torch.save = torch_save
    elif kind == "kill_in_copy":
        import shutil

        copyfileobj = shutil.copyfileobj

        def copy(src, dst, length=0):
            count[0] += 1
            if count[0] == n:
                _kill_after_half(src.read(), dst)
            return copyfileobj(src, dst, length) if length else copyfileobj(src, dst)

        shutil.copyfileobj = copy
    elif kind in ("nan", "nan_memory", "nan_assoc"):
        import dataclasses

        from rmt_fairseq.models.rmt_lm import RMTDecoder

        forward_segment = RMTDecoder.forward_segment

        def fwd(self, tokens, memory, cache, *args, **kwargs):  # ARMT's loop also passes assoc=
            out = forward_segment(self, tokens, memory, cache, *args, **kwargs)
            if self.training:
                count[0] += 1
                if count[0] == n:
                    if kind == "nan":
                        return dataclasses.replace(out, hidden=out.hidden * float("nan"))
                    if kind == "nan_assoc":
                        return dataclasses.replace(out, assoc=[out.assoc[0] * float("nan"), *out.assoc[1:]])
                    return dataclasses.replace(out, memory=out.memory * float("nan"))
            return out

        RMTDecoder.forward_segment = fwd
    else:
        raise ValueError(f"RMT_FAULT: unknown fault {fault!r}")


def main(cli: str) -> None:
    if os.environ.get("RMT_FAULT"):
        install(os.environ["RMT_FAULT"])
    if cli == "fairseq-train":
        from fairseq_cli.train import cli_main
    else:
        raise ValueError(cli)
    sys.argv[0] = cli
    sys.exit(cli_main())
