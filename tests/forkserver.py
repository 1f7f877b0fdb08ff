"""A pre-imported parent that runs the console scripts of this stack (fairseq-train, fairseq-eval-lm, rmt-data,
deepspeed, torchrun ...) in forked children, so a test pays torch's, fairseq's and DeepSpeed's imports once per
pytest process instead of once per command (issue 25: about 3.5 s warm, 13-20 s on a loaded machine).

How a command runs (tests/forkclient.py is the other half):
- The test starts `python -S tests/forkclient.py script:/venv/bin/fairseq-train ARGS...` where it used to start
  `/venv/bin/fairseq-train ARGS...` (helpers.command). The client sends its argv, cwd, environment and its own
  stdin/stdout/stderr file descriptors (SCM_RIGHTS) to this server.
- The server (single-threaded; it has imported torch, fairseq's CLIs and DeepSpeed, and run no torch operation,
  so no thread pool exists to be copied) forks a supervisor, which forks the tool's process. That process puts
  the client's descriptors on 0/1/2, takes the client's cwd and environment, sets torch's thread count from
  OMP_NUM_THREADS, and runs the console script file itself as `__main__` (runpy.run_path: the same file,
  `main`, argv, exit code, stdout and stderr that a fresh process has); it exits as Python does (non-daemon
  threads joined, atexit handlers, streams flushed).
- The supervisor sends the tool's pid, forwards the signals the client receives (SIGTERM, SIGINT ...), kills the
  tool's process group when the client dies (a SIGKILL of the client, a test's timeout), and sends the exit status
  back; the client exits with it (or dies of the same signal).
- The client runs the real command instead (os.execv) whenever the environment differs from the server's in a
  variable read at import time (PYTHON* other than PYTHONPATH, RMT_FAIRSEQ_VERBOSE, LOGLEVEL, CUDA*, TORCH*, OMP_*
  other than OMP_NUM_THREADS, ...; SENSITIVE_PREFIXES below): the kill-and-resume tests, which set
  PYTHONUNBUFFERED, run as fresh processes, as do commands when no server runs (RMT_TEST_FORKSERVER=0) or it cannot
  be reached. Each PYTHONPATH gets a zygote of its own, with the sys.path that PYTHONPATH gives.

The children of the tool (fairseq-train's spawned ranks, the deepspeed launcher's ranks, torchrun's workers) are
started by the tool as usual: fresh processes that import everything themselves.
"""

import array
import json
import os
import select
import signal
import socket
import struct
import sys

# environment variables read while torch / fairseq / DeepSpeed / the plugin are imported (or that change how the
# interpreter runs): a command whose value differs from the server's runs as a fresh process
SENSITIVE_PREFIXES = ("PYTHON", "RMT_FAIRSEQ_VERBOSE", "LOGLEVEL", "CUDA", "TORCH", "OMP_", "KMP_", "MKL_", "OPENBLAS",
                      "GOMP", "LD_", "DS_", "HYDRA", "NCCL", "MPLBACKEND")
EMULATED = {"OMP_NUM_THREADS"}  # set in the child (torch.set_num_threads)
# read when used, not at import (torch's inductor sets its cache folder in the environment of the process that
# compiles: a test that compiled passes it on)
RUNTIME = {"TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"}
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)


def sensitive(env: dict) -> dict:
    """The variables that must equal the server's for a command to be forked (PYTHONPATH is not among them: each
    PYTHONPATH gets a zygote of its own, with that sys.path)."""
    return {k: v for k, v in env.items()
            if k.startswith(SENSITIVE_PREFIXES) and k not in EMULATED | RUNTIME and k != "PYTHONPATH"}


def pythonpath(env: dict) -> list:
    """PYTHONPATH's entries as sys.path gets them (empty ones dropped)."""
    return [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]


def send_message(sock, payload: dict, fds=()) -> None:
    data = json.dumps(payload).encode()
    data = struct.pack("!I", len(data)) + data
    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
    sent = sock.sendmsg([data], ancillary)
    if sent < len(data):
        sock.sendall(data[sent:])


def receive_message(sock, max_fds: int = 3):
    fds = array.array("i")
    data, ancdata, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(max_fds * fds.itemsize))
    for level, kind, cdata in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(cdata[: len(cdata) - (len(cdata) % fds.itemsize)])
    if len(data) < 4:
        raise ConnectionError("short request")
    (n,) = struct.unpack("!I", data[:4])
    data = data[4:]
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("request cut short")
        data += chunk
    return json.loads(data[:n]), list(fds)


def preload(target: str) -> None:
    """What a fresh process of `target` imports before its main runs, in the same order: the console script's own
    top-level imports (`from fairseq_cli.train import cli_main`, which sets up fairseq-train's logging before it
    imports fairseq; `from rmt_fairseq.cli.data import main` ...). Nothing else is run."""
    import ast

    kind, name = target.split(":", 1)
    if kind != "script":
        return
    with open(name, "rb") as f:
        tree = ast.parse(f.read(), name)
    imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
    sys.path[0] = os.path.dirname(name)  # as in the script's own process
    exec(compile(ast.Module(body=imports, type_ignores=[]), name, "exec"), {"__name__": "__forkserver_preload__"})


def zygote_path(folder: str, target: str, env: dict) -> str:
    """The socket of the zygote that serves `target` under this environment's PYTHONPATH."""
    import hashlib

    key = "\0".join([target, *pythonpath(env)])
    return os.path.join(folder, "z-" + hashlib.sha1(key.encode()).hexdigest()[:16] + ".sock")


def _exit_code(exc: SystemExit) -> int:
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


def run_tool(request: dict, fds: list) -> None:
    """The tool's process: never returns."""
    code = 70
    try:
        os.setpgid(0, 0)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for target, fd in zip((0, 1, 2), fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        os.chdir(request["cwd"])
        os.environ.clear()
        os.environ.update(request["env"])
        import random

        import numpy as np
        import torch

        random.seed()  # a fresh process draws these from the OS; the server's copies are shared by every child
        np.random.seed()
        threads = os.environ.get("OMP_NUM_THREADS", "")
        if threads.isdigit() and int(threads) > 0:
            torch.set_num_threads(int(threads))
        kind, target = request["target"].split(":", 1)
        import runpy

        if kind == "script":
            sys.argv = [target, *request["args"]]
            sys.path[0] = os.path.dirname(target)
            run = lambda: runpy.run_path(target, run_name="__main__")  # noqa: E731
        else:  # python -m MODULE
            sys.argv = [target, *request["args"]]
            sys.path[0] = os.getcwd()
            run = lambda: runpy.run_module(target, run_name="__main__", alter_sys=True)  # noqa: E731
        interrupted = False
        try:
            run()
            code = 0
        except SystemExit as e:
            code = _exit_code(e)
        except KeyboardInterrupt:
            sys.excepthook(*sys.exc_info())
            interrupted, code = True, 130
        except BaseException:
            sys.excepthook(*sys.exc_info())
            code = 1
        import atexit
        import threading

        try:
            threading._shutdown()  # what the interpreter does at exit: wait for non-daemon threads
        except Exception:
            pass
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                code = code or 120
        if interrupted:  # Python dies of SIGINT after an uncaught KeyboardInterrupt
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        os._exit(code)


def supervise(conn, request: dict, fds: list) -> None:
    """Between the client and the tool's process: never returns."""
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        pid = os.fork()
        if pid == 0:
            conn.close()
            run_tool(request, fds)
        for fd in fds:
            os.close(fd)
        try:
            os.setpgid(pid, pid)
        except OSError:  # the child did it first, or has already exited
            pass
        conn.sendall(f"pid {pid}\n".encode())
        pidfd = os.pidfd_open(pid) if hasattr(os, "pidfd_open") else None
        client_gone, buf, status = False, b"", None
        while status is None:
            watch = ([] if client_gone else [conn]) + ([pidfd] if pidfd is not None else [])
            ready, _, _ = select.select(watch, [], [], None if pidfd is not None else 0.05)
            if conn in ready:
                data = conn.recv(256)
                if not data:  # the client died (SIGKILL, a test's timeout): so does the tool, as a process would
                    client_gone = True
                    for kill in (os.killpg, os.kill):
                        try:
                            kill(pid, signal.SIGKILL)
                            break
                        except OSError:
                            pass
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.startswith(b"sig "):
                        try:
                            os.kill(pid, int(line[4:]))
                        except OSError:
                            pass
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = os.waitstatus_to_exitcode(st)
        if not client_gone:
            try:
                conn.sendall(f"exit {status}\n".encode())
            except OSError:
                pass
    finally:
        os._exit(0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


def _listen(path: str):
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path + ".tmp")
    server.listen(64)
    os.rename(path + ".tmp", path)  # the socket appears once its imports are done
    server.settimeout(1.0)
    return server


def _requests(server, owner: int, max_fds: int):
    """(connection, request, fds) of each well-formed request on `server`, while the pytest process `owner` lives."""
    while _alive(owner):
        try:
            conn, _ = server.accept()
        except socket.timeout:
            continue
        conn.settimeout(None)
        try:
            request, fds = receive_message(conn, max_fds=max_fds)
        except (OSError, ValueError):
            conn.close()
            continue
        yield conn, request, fds


def serve_target(path: str, target: str, env: dict, owner: int) -> None:
    """A zygote: the imports of one console script done once (with the client's environment and the sys.path its
    PYTHONPATH gives); forks a supervisor (and the tool) per request."""
    try:
        mine = pythonpath(dict(os.environ))
        sys.path[1:] = pythonpath(env) + [p for p in sys.path[1:] if p not in mine]
        os.environ.clear()
        os.environ.update(env)
        preload(target)
    except BaseException:  # the clients run the command as a fresh process instead (it will show the error)
        open(path + ".failed", "w").close()
        raise
    sys.stdout.flush()
    sys.stderr.flush()
    server = _listen(path)
    for conn, request, fds in _requests(server, owner, max_fds=3):
        pid = os.fork()
        if pid == 0:
            server.close()
            supervise(conn, request, fds)
        conn.close()
        for fd in fds:
            os.close(fd)
    os._exit(0)


def serve(folder: str, owner: int) -> None:
    """The root: torch imported (the one import every command shares, with no side effect on logging), and
    torch._dynamo, which torch imports lazily when the first optimizer is built (fairseq-train, DeepSpeed): 1.9 s
    of each training command here, two thirds of a small fairseq-train's main; starts a
    zygote per console script and PYTHONPATH on a client's request ({"spawn": target, "env": ...}); answers at once
    (the client waits for the zygote's socket)."""
    import torch  # noqa: F401
    import torch._dynamo  # noqa: F401

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # zygotes and supervisors are reaped by the kernel
    server = _listen(os.path.join(folder, "server.sock"))
    started = set()
    for conn, request, _ in _requests(server, owner, max_fds=0):
        try:
            target, env = request["spawn"], request["env"]
            path = zygote_path(folder, target, env)
            if path not in started:
                started.add(path)
                if os.fork() == 0:
                    server.close()
                    conn.close()
                    try:
                        serve_target(path, target, env, owner)
                    finally:
                        os._exit(0)
            conn.sendall(b"ok\n")
        except (OSError, KeyError):
            pass
        conn.close()


if __name__ == "__main__":
    serve(sys.argv[1], int(sys.argv[2]))
