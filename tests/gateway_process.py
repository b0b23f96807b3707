"""A real `python -m gateway` process for tests that must read what it logs or watch its memory: started with
settings overrides, its port read from the start-up line, its stderr kept in a file, stopped with SIGTERM."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

from tests.conftest import settings_env

ROOT = Path(__file__).resolve().parents[1]


def _die_with_parent() -> None:
    # Linux prctl(PR_SET_PDEATHSIG, SIGTERM): a test run that is killed (a timeout) leaves no gateway behind.
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


class GatewayProcess:
    def __init__(self, stderr_path: Path, **overrides: str) -> None:
        env = {**os.environ, **settings_env(), "PYTHONUNBUFFERED": "1", "GATEWAY_LOG_LEVEL": "INFO"}
        env.update({f"GATEWAY_{k}": v for k, v in overrides.items()})
        self.stderr_path = stderr_path
        with open(stderr_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "gateway"], cwd=ROOT, env=env,
                                         stdout=subprocess.PIPE, stderr=err, preexec_fn=_die_with_parent)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()  # the start-up line, or end of file when it failed
        found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if found is None:
            self.stop()
            raise RuntimeError(f"the gateway did not start: {line!r}\n{self.stderr()[-3000:]}")
        self.port = int(found.group(1))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def rss_kib(self) -> int:
        """Resident memory (VmRSS of /proc/<pid>/status), in KiB."""
        with open(f"/proc/{self.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode
