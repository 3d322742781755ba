"""``python -m lightning_modules.cli ...`` started by forking a process that has already imported torch, Lightning
and the project, instead of a fresh interpreter that spends ~6 CPU-seconds importing them.

Each test process (pytest-xdist worker) starts one server (``python tests/forked.py SOCKET``) the first time a test
runs a command. Per command, the server forks a keeper, which forks the command and reports its exit status. The
command is a process of its own, with its own pid, session, standard streams, working folder and environment, and
runs its module as ``__main__`` as ``python -m`` does (``runpy``). Signals, exit statuses,
the processes it starts (ranks, data workers, servers) and interpreter shutdown (``atexit``) are the real ones.
What differs is that the imports were already done. ``pytest --fresh-commands`` starts every command in a fresh
interpreter instead.

The commands that ``tests/conftest.py`` never forks: anything but ``python -m MODULE``, such as the README's
commands (``.venv/bin/nxtp``), the import checks (``python -X importtime``) and the runs that a sweep or a DDP
launch starts themselves. A command whose environment differs from the server's in anything but ``FORKABLE_ENV`` is
also started fresh, since the environment can change what an import does.
"""

from __future__ import annotations

import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

# What every command imports; imported once, by the server.
PRELOAD = (
    "torch",
    "lightning.pytorch",
    "open_clip",
    "transformers",
    "lightning_modules.cli.train",
    "lightning_modules.lit_nxtp",
    "lightning_modules.inference",
    "lightning_modules.recognizer",
    "datamodules.webdataset",
    "nltk",  # read by the captions' label extraction (datamodules/labels.py); brings scikit-learn
)
# A command whose environment differs from the server's only in these variables is forked: they are read when a
# command runs, not when it imports (pytest's, Lightning's seed, SLURM's, a distributed launch's)...
FORKABLE_ENV = ("PYTEST_", "PL_GLOBAL_SEED", "PL_SEED_WORKERS", "SLURM_", "MASTER_", "WORLD_SIZE", "RANK", "LOCAL_")
FORKABLE_ENV += ("PATH", "NO_PROXY", "no_proxy")  # ...where programs and URLs are looked up...
# ...or set by imports in the test process (scikit-learn, Lightning, torch's inductor), as a command's imports set them
FORKABLE_ENV += ("KMP_DUPLICATE_LIB_OK", "KMP_INIT_AT_FORK", "PYTORCH_NVML_BASED_CUDA_CHECK", "_TORCHINDUCTOR_")
READY = b"ready\n"


def serve(path: str) -> tuple[list[str], dict[str, str], str, bool, list[int]]:
    """Listen on the Unix socket ``path`` and fork a keeper per request, forever. Returns only in a command
    process: its request."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    import threading

    # Forking copies only the calling thread: a Python thread started by an import would be lost in the command.
    # (Idle native pools, such as OpenBLAS's, are what every `nxtp fit` forks its data workers beside.)
    if threading.active_count() != 1:
        raise SystemExit(f"forked.py: threads after the imports: {threading.enumerate()}")
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # keepers are reaped by the kernel
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    server.settimeout(5)
    parent = os.getppid()
    os.write(1, READY + json.dumps(dict(os.environ)).encode() + b"\n")  # as the imports left it
    while True:
        try:
            conn, _ = server.accept()
        except TimeoutError:
            if os.getppid() != parent:  # the test process is gone
                raise SystemExit(0) from None
            continue
        if os.fork() == 0:
            server.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            return _keep(conn)
        conn.close()


def _keep(conn: socket.socket) -> tuple[list[str], dict[str, str], str, bool, list[int]]:
    """The keeper: read the request, fork the command, send its pid and then its exit status. Returns only in the
    command process."""
    import pickle

    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    size = int.from_bytes(data[:8], "big")
    while len(data) < 8 + size:
        data += conn.recv(1 << 16)
    argv, env, cwd, new_session = pickle.loads(data[8:])
    pid = os.fork()
    if pid == 0:
        conn.close()
        return argv, env, cwd, new_session, fds
    for fd in fds:
        os.close(fd)
    conn.sendall(f"{pid}\n".encode())
    _, status = os.waitpid(pid, 0)
    conn.sendall(f"{os.waitstatus_to_exitcode(status)}\n".encode())
    os._exit(0)


def _become(argv: list[str], env: dict[str, str], cwd: str, new_session: bool, fds: list[int]) -> None:
    """In the command process: take the request's streams, folder, environment and arguments, then run the module
    as ``python -m`` does (``sys.path[0]`` the working folder)."""
    import runpy

    if new_session:
        os.setsid()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    for fd in set(fds) - {0, 1, 2}:
        os.close(fd)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    sys.path[0] = os.getcwd()
    module = argv[2]
    sys.argv = [module, *argv[3:]]  # runpy puts the module's file in sys.argv[0], as `python -m` does
    runpy.run_module(module, run_name="__main__", alter_sys=True)


# the test side ---------------------------------------------------------------------------------------------------


class Server:
    """One forking server, started on first use and stopped with the test process."""

    def __init__(self, folder: Path, env: dict[str, str]) -> None:
        self.folder = folder
        self.path = str(folder / "forked.sock")
        self.log = folder / "forked.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, __file__, self.path],
                env=env,
                cwd=folder,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )
        if not _readable(self.proc.stdout, 300) or self.proc.stdout.readline() != READY:
            self.proc.kill()
            raise RuntimeError(f"forked.py did not start:\n{self.log.read_text()[-3000:]}")
        self.env = json.loads(self.proc.stdout.readline())  # what the commands it forks start with

    def forks(self, cmd: list[str], env: dict[str, str]) -> bool:
        """Whether ``cmd`` with ``env`` can be forked from this server (see the module's docstring)."""
        if cmd[:2] != [sys.executable, "-m"] or len(cmd) < 3 or self.proc.poll() is not None:
            return False
        changed = {k for k in env.keys() | self.env.keys() if env.get(k) != self.env.get(k)}
        return all(k.startswith(FORKABLE_ENV) for k in changed)

    def start(self, cmd: list[str], env: dict[str, str], cwd: Path, **kwargs) -> Forked:
        return Forked(self.path, cmd, env, cwd, **kwargs)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


class Forked:
    """A forked command, with the parts of :class:`subprocess.Popen` the tests use."""

    def __init__(
        self,
        path: str,
        args: list[str],
        env: dict[str, str],
        cwd: Path,
        stdin=None,
        stdout=None,
        stderr=None,
        text: bool = False,
        start_new_session: bool = False,
    ) -> None:
        import pickle

        self.args, self.text, self.returncode = args, text, None
        self.stdin = None
        ends: list[int] = []  # the null device opened for the command, closed once sent

        def stream(spec, fd: int, mode: str):
            if spec is None:
                return fd, None
            if spec == subprocess.DEVNULL:
                null = os.open(os.devnull, os.O_RDWR)
                ends.append(null)
                return null, None
            if spec == subprocess.PIPE:
                read, write = os.pipe()
                ours, theirs = (write, read) if mode == "w" else (read, write)
                return theirs, open(ours, mode + "b")
            return (spec if isinstance(spec, int) else spec.fileno()), None

        stdin_fd, self.stdin = stream(stdin, 0, "w")
        stdout_fd, self.stdout = stream(stdout, 1, "r")
        stderr_fd, self.stderr = (stdout_fd, None) if stderr == subprocess.STDOUT else stream(stderr, 2, "r")
        sent = [stdin_fd, stdout_fd, stderr_fd]
        self.conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.conn.connect(path)
        request = pickle.dumps((list(args), dict(env), str(cwd), start_new_session))
        socket.send_fds(self.conn, [len(request).to_bytes(8, "big") + request], sent)
        for fd, pipe in ((stdin_fd, self.stdin), (stdout_fd, self.stdout), (stderr_fd, self.stderr)):
            if pipe is not None:
                os.close(fd)  # the command's end of our pipe: it has its own copy now
        for fd in ends:
            os.close(fd)
        self._reply = b""
        pid = self._line(60)
        if pid is None:
            raise RuntimeError(f"forked.py: no process for {args[:5]} within 60 s")
        self.pid = int(pid)
        self._out: dict[str, list[bytes]] = {"stdout": [], "stderr": []}

    def _line(self, timeout: float | None) -> bytes | None:
        """The keeper's next line (a pid, then an exit status), or None if none came within ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self._reply:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not _readable(self.conn, left):
                return None
            chunk = self.conn.recv(64)
            if not chunk:
                raise RuntimeError(f"forked.py: the keeper of {self.args[:5]} ended without an exit status")
            self._reply += chunk
        line, self._reply = self._reply.split(b"\n", 1)
        return line

    def poll(self) -> int | None:
        if self.returncode is None and (line := self._line(0)) is not None:
            self.returncode = int(line)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            line = self._line(timeout)
            if line is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.returncode = int(line)
        return self.returncode

    def communicate(self, input=None, timeout: float | None = None):
        """Read stdout and stderr to their ends, then wait; what was read before a timeout is kept for the next
        call, as Popen does."""
        if self.stdin is not None:
            if input:
                self.stdin.write(input.encode() if self.text else input)
            self.stdin.close()
            self.stdin = None
        deadline = None if timeout is None else time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            for name in ("stdout", "stderr"):
                pipe = getattr(self, name)
                if pipe is not None and not pipe.closed:
                    sel.register(pipe, selectors.EVENT_READ, name)
            while sel.get_map():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(self.args, timeout)
                for key, _ in sel.select(left):
                    chunk = os.read(key.fileobj.fileno(), 1 << 16)
                    if chunk:
                        self._out[key.data].append(chunk)
                    else:
                        sel.unregister(key.fileobj)
                        key.fileobj.close()
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return tuple(
            None if getattr(self, name) is None else self._decode(b"".join(self._out[name]))
            for name in ("stdout", "stderr")
        )

    def _decode(self, data: bytes):
        return data.decode() if self.text else data

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def __enter__(self) -> Forked:
        return self

    def __exit__(self, *exc) -> None:
        for pipe in (self.stdin, self.stdout, self.stderr):
            if pipe is not None and not pipe.closed:
                pipe.close()
        self.wait()
        self.conn.close()


def _readable(conn, timeout: float | None) -> bool:
    """Whether ``conn`` (a socket or a pipe) has something to read within ``timeout`` seconds."""
    with selectors.DefaultSelector() as sel:
        sel.register(conn, selectors.EVENT_READ)
        return bool(sel.select(timeout))


if __name__ == "__main__":
    _become(*serve(sys.argv[1]))
