"""Checkpoint files that are complete or absent; a clear error (or a fallback) for ones that are not.

fairseq writes checkpoint_E_U.pt atomically (a .tmp file, then rename), but then copies it to
checkpoint_last.pt / checkpoint_best.pt with shutil.copyfile, in place: a kill during that copy leaves a
truncated checkpoint_last.pt, the very file the next run resumes from, and torch.load then fails with a message
that does not name the file. `install()` (called when the plugin is imported) changes three fairseq functions,
for local paths only:

- torch_persistent_save: write to a temporary file in the same directory, flush and fsync, os.replace, fsync
  the directory (fairseq's own rename, plus durability);
- PathManager.copy: the same for the checkpoint_last/best copies, so they too are complete or absent;
- load_checkpoint_to_cpu: an unreadable file raises RMTConfigError naming it (one `error:` line, exit 2);
- Trainer.load_checkpoint (the resume): with `--restore-fallback` in the trainer's task config (task rmt_lm) an
  unreadable checkpoint is replaced by the newest readable checkpoint*.pt in the same directory, with a warning
  naming both files (`fallback_for` picks it, for the task's checks too).
"""

import glob
import logging
import os
import shutil
import tempfile

from rmt_fairseq.errors import RMTConfigError

logger = logging.getLogger(__name__)

_state = {"installed": False}


def _record_source(state: dict, path: str) -> dict:
    """The loaded checkpoint's model config names its file (`checkpoint_file`, models/config.py TrainedWithConfig),
    for the error lines of the model build that follows; only configs of this plugin's families have the field.
    A config from before --associative-write existed gets the write rule its model was trained with (parallel)."""
    from omegaconf import OmegaConf, open_dict

    model_cfg = (state.get("cfg") or {}).get("model") if isinstance(state, dict) else None
    if OmegaConf.is_config(model_cfg) and "dictionary_fingerprint" in model_cfg:
        with open_dict(model_cfg):
            model_cfg.checkpoint_file = path
            if "associative_memory" in model_cfg and "associative_write" not in model_cfg:
                model_cfg.associative_write = "parallel"  # written before --associative-write: the rule it used
    return state
# what torch.load / fairseq's upgrade raise on a truncated or corrupt file
LOAD_ERRORS = (RuntimeError, EOFError, OSError, ValueError, KeyError, AttributeError, ImportError)


def _is_local(path) -> bool:
    return isinstance(path, str) and "://" not in path


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write_fn) -> None:
    """write_fn(file object) into a temporary file beside `path`, fsync, then rename over `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def _readable_candidates(path: str):
    """Other checkpoint*.pt files in path's directory, newest first (candidates; read by the caller)."""
    directory = os.path.dirname(os.path.abspath(path))
    files = [f for f in glob.glob(os.path.join(directory, "checkpoint*.pt"))
             if os.path.abspath(f) != os.path.abspath(path) and not os.path.basename(f).startswith("crash")]
    return sorted(files, key=lambda f: os.path.getmtime(f), reverse=True)


def fallback_for(path: str, enabled: bool):
    """With --restore-fallback (`enabled`), the file loaded in place of an unreadable checkpoint `path`: the newest
    readable checkpoint*.pt beside it. None when the fallback is off, `path` reads, or no file beside it reads. The
    resume (Trainer.load_checkpoint) and the task's checks (tasks/rmt_lm.py build_model) both take the file from
    here."""
    import torch

    if not enabled or not _is_local(path) or _readable(path, torch):
        return None
    return _newest_readable_beside(path)


def _newest_readable_beside(path: str):
    """The newest readable checkpoint*.pt in path's directory other than path (None: none reads)."""
    import torch

    return next((c for c in _readable_candidates(path) if _readable(c, torch)), None)


def install() -> None:
    if _state["installed"]:
        return
    _state["installed"] = True
    import argparse

    import torch

    # fairseq keeps a legacy optimizer's config (--optimizer sgd, nag, adagrad ...) as an argparse.Namespace in
    # the checkpoint's cfg; torch >= 2.6 loads with weights_only=True and refuses it, so fairseq-eval-lm and a
    # resume fail on every such checkpoint. A Namespace is a plain attribute holder: allow it.
    if hasattr(torch.serialization, "add_safe_globals"):
        torch.serialization.add_safe_globals([argparse.Namespace])
    from fairseq import checkpoint_utils
    from fairseq.file_io import PathManager
    from fairseq.trainer import Trainer

    original_save = checkpoint_utils.torch_persistent_save
    original_copy = PathManager.copy
    original_load = checkpoint_utils.load_checkpoint_to_cpu

    def torch_persistent_save(obj, filename, async_write: bool = False):
        if async_write or not _is_local(filename):
            return original_save(obj, filename, async_write)
        atomic_write(filename, lambda f: torch.save(obj, f))

    def copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
        if not (_is_local(src_path) and _is_local(dst_path)):
            return original_copy(src_path, dst_path, overwrite)
        if os.path.exists(dst_path) and not overwrite:
            raise FileExistsError(dst_path)

        def write(f):
            with open(src_path, "rb") as src:
                shutil.copyfileobj(src, f, 1 << 20)

        atomic_write(dst_path, write)
        return True

    def load_checkpoint_to_cpu(path, arg_overrides=None, load_on_all_ranks=False):
        if _is_local(path) and not os.path.exists(path):
            raise RMTConfigError(f"checkpoint {path}: no such file")
        try:
            return _record_source(original_load(path, arg_overrides, load_on_all_ranks), path)
        except LOAD_ERRORS as e:
            if isinstance(e, RMTConfigError) or not _is_local(path) or _readable(path, torch):
                raise  # the file reads: the error is about its contents (e.g. another architecture)
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            raise RMTConfigError(f"checkpoint {path} is truncated or corrupt ({reason}); resume from an earlier one "
                                 f"with --restore-file PATH, or pass --restore-fallback to load the newest readable "
                                 f"checkpoint in {os.path.dirname(os.path.abspath(path))}") from None

    original_resume = Trainer.load_checkpoint

    def resume(self, filename, *args, **kwargs):
        """--restore-fallback, read from this trainer's task config: an unreadable checkpoint to resume from is
        replaced by the newest readable one beside it (a warning names both; none readable: one error line)."""
        if getattr(self.cfg.task, "restore_fallback", False) and _is_local(filename) and os.path.exists(filename):
            reason = _unreadable_reason(filename, torch)
            if reason is not None:
                cand = _newest_readable_beside(filename)
                if cand is None:
                    raise RMTConfigError(f"checkpoint {filename} is truncated or corrupt ({reason}) and "
                                         f"--restore-fallback found no readable checkpoint*.pt beside it")
                logger.warning(f"checkpoint {filename} is truncated or corrupt ({reason}); --restore-fallback: "
                               f"loading {cand} instead")
                filename = cand
        return original_resume(self, filename, *args, **kwargs)

    checkpoint_utils.torch_persistent_save = torch_persistent_save
    PathManager.copy = staticmethod(copy)
    checkpoint_utils.load_checkpoint_to_cpu = load_checkpoint_to_cpu
    Trainer.load_checkpoint = resume


def _unreadable_reason(path: str, torch):
    """Why torch cannot read the file ("Type: first line of the message"), None when it reads (a zip archive with
    every record intact)."""
    try:
        torch.load(path, map_location="cpu", weights_only=False, mmap=False)
        return None
    except Exception as e:
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"


def _readable(path: str, torch) -> bool:
    return _unreadable_reason(path, torch) is None
