"""Running the model server as a process group: start, wait until it answers, stop it and all it spawned."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow

from medldm.errors import ModelError
from medldm.serving.registry import _use_tracking_uri
from medldm.tracking.download import _download

def serve(model_uri: str, host: str = "127.0.0.1", port: int = 5000, env_manager: str = "local", *,
          workers: int | None = None, timeout_s: int | None = None, env: dict[str, str] | None = None,
          log_path: str | os.PathLike | None = None, tracking_uri: str | None = None) -> subprocess.Popen:
    """Serve a registered or logged model over HTTP in its own process group: MLflow's scoring server
    (``mlflow models serve``'s app, same routes and answers) run by uvicorn behind medldm's request guard
    (``medldm.serving.app``: the body size is checked before the body is read). ``env_manager`` must be
    "local" (the installed medldm is the model's code).

    ``env`` adds variables for the server (e.g. MEDLDM_MAX_PAYLOAD_MB, MEDLDM_DEVICE; MEDLDM_WARMUP=0 skips the
    warm-up reconstruction the model otherwise runs before /ping answers); ``timeout_s`` sets
    MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT (MLflow's default 60 s is short for full-size CPU sampling).
    The server's output goes to ``log_path`` (else it is inherited). Stop it with :func:`stop`.
    """
    _use_tracking_uri(tracking_uri)
    bin_dir = str(Path(sys.executable).parent)
    penv = {**os.environ, **(env or {})}
    penv["PATH"] = bin_dir + os.pathsep + penv.get("PATH", "")
    penv.setdefault("MEDLDM_WARMUP", "1")
    penv["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()  # resolved here: a relative sqlite path needs our cwd
    if timeout_s:
        penv["MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT"] = str(int(timeout_s))
    from mlflow.pyfunc import scoring_server

    if env_manager != "local":
        raise ModelError(f"env_manager={env_manager!r}: medldm serves with the installed medldm only ('local')")
    root = Path(model_uri) if Path(str(model_uri)).is_dir() else _download(str(model_uri))[0]
    penv[scoring_server._SERVER_MODEL_PATH] = str(root.resolve())  # where MLflow's app loads the model from
    penv.setdefault("MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT", "60")
    cmd = [sys.executable, "-m", "uvicorn", "--host", host, "--port", str(int(port)), "medldm.serving.app:app"]
    if workers:
        cmd += ["--workers", str(int(workers))]
    out = open(log_path, "ab") if log_path else None  # noqa: SIM115 - the child keeps it
    try:
        return subprocess.Popen(cmd, env=penv, stdout=out, stderr=subprocess.STDOUT if out else None,
                                start_new_session=True)
    finally:
        if out:
            out.close()


def wait_until_ready(url: str, timeout: float = 120.0, proc: subprocess.Popen | None = None) -> float:
    """Poll ``URL/ping`` until it answers 200; returns the seconds waited. Raises if ``proc`` exits first."""
    ping = url.rstrip("/") + "/ping"
    t0 = time.time()
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the model server exited with code {proc.returncode} before answering {ping}")
        try:
            with urllib.request.urlopen(ping, timeout=2) as resp:
                if resp.status == 200:
                    return time.time() - t0
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.time() - t0 > timeout:
            raise TimeoutError(f"{ping} did not answer within {timeout:.0f} s")
        time.sleep(0.5)


def _group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is left in process group ``pgid``."""
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    for stat in proc_dir.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> int | None:
    """End a server started by :func:`serve` and everything it spawned (uvicorn and its workers).

    SIGTERM to its process group, wait until the whole group is gone, SIGKILL whatever is left after
    ``timeout``. Returns the exit code of the ``mlflow models serve`` process.
    """
    pgid = proc.pid  # serve() starts it as a session (and group) leader
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.time() + timeout
    while time.time() < deadline:
        proc.poll()
        if proc.returncode is not None and not _group_alive(pgid):
            return proc.returncode
        time.sleep(0.1)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        return proc.wait(5)
    except subprocess.TimeoutExpired:
        return None
