"""`kvrelay serve` as a child process in its own session, for the e2e tests that need a whole
server: signals to it or to its process group, and the processes it started (the gateway, the
Router and worker actors, Ray's GCS and raylet), read from /proc by session id."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.e2e.served_cluster import _wait_healthy, free_port

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def tiny_serve_args(model_dir, *extra: str) -> list[str]:
    """`kvrelay serve` flags for 1P+1D on CPU over gloo with the tiny model named 'tiny'."""
    return ["--model", str(model_dir), "--device", "cpu", "--kv-transport", "gloo",
            "--block-size", "8", "--num-blocks", "1200", "--served-model-name", "tiny", *extra]


class ServeProcess:
    """`kvrelay serve ARGS --port FREE` in a new session (its pid is the session and group id)
    with stdout and stderr in `log_path`; `close()` SIGKILLs whatever of it is left."""

    def __init__(self, args: list[str], log_path: Path, ready_timeout_s: float = 120.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [sys.executable, "-m", "cluster.cli", "serve", *args, "--port", str(self.port)]
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, preexec_fn=_term_on_our_exit)
        try:
            _wait_healthy(self.url, ready_timeout_s)
        except TimeoutError as exc:
            self.close()
            raise RuntimeError(f"kvrelay serve not ready (exit code {self.process.returncode})"
                               f":\n{self.log()[-3000:]}") from exc

    @property
    def pid(self) -> int:
        return self.process.pid

    def processes(self) -> dict[int, str]:
        """pid -> name of every live process of this server's session (Ray's included)."""
        found = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                stat = _read(entry / "stat")
                # Fields after the parenthesized command: state ppid pgrp session ...
                fields = stat.rsplit(")", 1)[-1].split() if stat else []
                if len(fields) > 3 and int(fields[3]) == self.pid and fields[0] != "Z":
                    found[int(entry.name)] = _name(entry)
        return found

    def rss_bytes(self) -> dict[str, int]:
        """Resident memory of each process of the session, keyed 'name pid'."""
        sizes = {}
        for pid, name in self.processes().items():
            statm = _read(Path(f"/proc/{pid}/statm"))
            if statm:
                sizes[f"{name} {pid}"] = int(statm.split()[1]) * _PAGE_SIZE
        return sizes

    def send(self, sig: signal.Signals, group: bool) -> None:
        """`sig` to the serve process alone, or to its whole process group."""
        if group:
            os.killpg(self.pid, sig)
        else:
            os.kill(self.pid, sig)

    def wait_exit(self, timeout_s: float) -> float:
        """Seconds until the serve process exited; raises TimeoutExpired after `timeout_s`."""
        start = time.monotonic()
        self.process.wait(timeout_s)
        return time.monotonic() - start

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def close(self) -> None:
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.process.poll() is None:
            self.process.wait(10)


def _term_on_our_exit() -> None:
    """In the child: SIGTERM when the test process dies (killed by a timeout, say), so the
    server drains and stops instead of living on in its own session."""
    ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).prctl(_PR_SET_PDEATHSIG,
                                                                    signal.SIGTERM)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:  # the process ended while we looked
        return ""


def _name(proc: Path) -> str:
    """Ray sets its actors' titles (`ray::Router`); others by their executable."""
    argv = _read(proc / "cmdline").split("\0")
    first = argv[0]
    if first.startswith("ray::"):
        return first.split()[0].split(".")[0]
    script = next((a for a in argv[1:3] if a.endswith(".py") or a == "cluster.cli"), None)
    return Path(script or first).name
