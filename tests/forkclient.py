"""Runs one console script through the tests' fork server (tests/forkserver.py), or as a fresh process when the
server cannot serve it. Started as `python -S tests/forkclient.py script:PATH ARGS...` (or `module:NAME`); -S and
the standard library only, so it starts in milliseconds. Exits with the tool's status, or dies of the tool's signal.
"""

import json
import os
import signal
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import forkserver  # noqa: E402  (standard library only)


def fresh(target: str, args: list) -> None:
    kind, name = target.split(":", 1)
    if kind == "script" and os.access(name, os.X_OK):
        os.execv(name, [name, *args])
    argv = [sys.executable, name, *args] if kind == "script" else [sys.executable, "-m", name, *args]
    os.execv(sys.executable, argv)


def _connect(path: str, server_pid: int, deadline: float):
    """A connection to the socket at `path` once it exists; None if its server is gone or fails first."""
    while not os.path.exists(path):
        if os.path.exists(path + ".failed") or time.time() > deadline:
            return None
        try:
            os.kill(server_pid, 0)
        except OSError:
            return None
        time.sleep(0.02)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    return sock


def connect(folder: str, target: str):
    """A connection to the zygote of `target` (started by the root server on first use, then kept), or None
    where the command has to run as a fresh process."""
    try:
        with open(os.path.join(folder, "server.json")) as f:
            server = json.load(f)
    except (OSError, ValueError):
        return None
    mine = forkserver.sensitive(dict(os.environ))
    if server["env"] != mine:
        if os.environ.get("RMT_TEST_FORKSERVER_LOG"):  # which variables sent a command to a fresh process
            with open(os.environ["RMT_TEST_FORKSERVER_LOG"], "a") as f:
                differ = sorted(k for k in set(server["env"]) | set(mine) if server["env"].get(k) != mine.get(k))
                f.write(json.dumps({"argv": sys.argv[1:3], "differ": differ}) + "\n")
        return None
    deadline = time.time() + 600
    path = forkserver.zygote_path(folder, target, dict(os.environ))
    if not os.path.exists(path):
        root = _connect(os.path.join(folder, "server.sock"), server["pid"], deadline)
        if root is None:
            return None
        try:
            forkserver.send_message(root, {"spawn": target, "env": dict(os.environ)})
            root.makefile("rb").readline()
        except OSError:
            return None
        finally:
            root.close()
    return _connect(path, server["pid"], deadline)


def main() -> None:
    target, args = sys.argv[1], sys.argv[2:]
    folder = os.environ.get("RMT_TEST_FORKSERVER", "")
    sock = connect(folder, target) if folder and folder != "0" else None
    if sock is None:
        fresh(target, args)
    forkserver.send_message(sock, {"target": target, "args": args, "cwd": os.getcwd(), "env": dict(os.environ)},
                            fds=[0, 1, 2])
    stream = sock.makefile("rb")
    line = stream.readline()
    if not line.startswith(b"pid "):
        sys.stderr.write("forkclient: the fork server did not start the command\n")
        os._exit(70)

    def forward(signum, _frame):
        try:
            sock.sendall(f"sig {signum}\n".encode())
        except OSError:
            pass

    for s in forkserver.FORWARDED_SIGNALS:
        signal.signal(s, forward)
    while True:
        try:
            line = stream.readline()
            break
        except InterruptedError:
            continue
    if not line.startswith(b"exit "):
        sys.stderr.write("forkclient: lost the fork server before the command ended\n")
        os._exit(70)
    status = int(line[5:])
    if status < 0:  # the tool died of a signal: so does this process, so the caller sees the same status
        for s in forkserver.FORWARDED_SIGNALS:
            signal.signal(s, signal.SIG_DFL)
        if -status not in (signal.SIGKILL, signal.SIGSTOP):  # those two have no handler to reset
            signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
        time.sleep(1)
        os._exit(128 - status)
    os._exit(status)


if __name__ == "__main__":
    main()
