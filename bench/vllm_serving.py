"""Start `vllm serve` from .venv-vllm on 127.0.0.1, talk to it over HTTP, stop it in bounded time.

Used by bench/vllm_throughput.py and tests/vllm/test_serve.py. The server runs in its own
session (process group), so stopping it reaches the API server, the engine core and every
tensor-parallel worker: SIGINT first (vLLM's graceful shutdown), SIGKILL after `STOP_GRACE_S`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VLLM_VENV = Path(os.environ.get("VLLM_VENV", ROOT / ".venv-vllm"))
VLLM = VLLM_VENV / "bin" / "vllm"
START_TIMEOUT_S = 420  # model load on 2 busy cores: ~30 s for smollm2, more with 3 ranks
STOP_GRACE_S = 30


def vllm_available() -> bool:
    return VLLM.is_file() and (VLLM_VENV / ".installed").is_file()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def thread_binding(ranks: int) -> str:
    """VLLM_CPU_OMP_THREADS_BIND for `ranks` workers: the usable cores dealt out in turn (vLLM's
    automatic binding wants one NUMA node per rank, which a small machine does not have)."""
    cores = sorted(os.sched_getaffinity(0))
    return "|".join(str(cores[i % len(cores)]) for i in range(ranks))


@dataclass
class Server:
    url: str
    model: str
    log: Path
    pid: int  # the API server's, which leads the session of every server process
    stop_seconds: float | None = None

    def post(self, path: str, body: dict, timeout: float = 600) -> dict:
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def get(self, path: str, timeout: float = 30) -> dict:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.loads(response.read())


def _log_tail(log: Path, lines: int = 40) -> str:
    text = log.read_text(errors="replace").splitlines() if log.is_file() else []
    return "\n".join(text[-lines:])


def _stop(proc: subprocess.Popen) -> float:
    """SIGINT the server's process group, SIGKILL it after STOP_GRACE_S; seconds it took."""
    start = time.monotonic()
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=STOP_GRACE_S)
    # workers of the group that outlive the API server
    deadline = time.monotonic() + STOP_GRACE_S
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
    return time.monotonic() - start


@contextmanager
def vllm_server(
    model: Path,
    log: Path,
    *extra: str,
    tensor_parallel: int = 1,
    max_model_len: int = 512,
    dtype: str = "float32",
    eager: bool = True,
) -> Iterator[Server]:
    """`vllm serve MODEL` on a free loopback port; yields once /health answers. eager=False
    lets vLLM trace the model with torch.compile (a minute more to start on 2 cores)."""
    port = free_port()
    env = dict(os.environ)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    env.pop("TRITON_INTERPRET", None)  # the tests' interpreter flag is not the server's
    if tensor_parallel > 1:
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", thread_binding(tensor_parallel))
    cmd = [
        str(VLLM), "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
        "--dtype", dtype, "--max-model-len", str(max_model_len),
        "--tensor-parallel-size", str(tensor_parallel), *(["--enforce-eager"] if eager else []),
        *extra,
    ]  # fmt: skip
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    server = Server(f"http://127.0.0.1:{port}", str(model), log, proc.pid)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {proc.returncode}:\n{_log_tail(log)}")
            try:
                with urllib.request.urlopen(server.url + "/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vllm serve not up in {START_TIMEOUT_S} s:\n{_log_tail(log)}")
            time.sleep(1)
        yield server
    finally:
        server.stop_seconds = _stop(proc)
