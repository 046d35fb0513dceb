"""The fuzzers' shared loop (fuzz_dicom.py, fuzz_formats.py): each case is made in a folder and checked in a
worker process with a per-case timeout, so a hang is seen as one and a crash never takes the run down.

A check returns (outcome, detail, crash class):

    ok       the input was read (and, where the check goes further, reconstructed or answered)
    failed   refused with a typed error: the message a user would see
    crash    any other exception escaped (a bug: users would get a traceback)
    hang     the worker did not answer within the timeout (killed and restarted)
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import re
import shutil
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path
from typing import Callable

Check = Callable[[Path], tuple[str, str, str]]


def where(exc: BaseException) -> str:
    """The innermost medldm frame (else the innermost frame): the crash class."""
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/medldm/" in f.filename.replace("\\", "/")]
    f = (ours or frames)[-1] if frames else None
    return f"{Path(f.filename).name}:{f.name}" if f else "?"


def reason_class(detail: str) -> str:
    """The reason without paths and numbers, so similar refusals count together."""
    text = detail.split("; ")[0]
    text = re.sub(r"\S*/\S*|\S+\.(dcm|nii|gz|h5)\b", "<path>", text)
    text = re.sub(r"-?\d+(\.\d+)?(e[-+]?\d+)?", "#", text)
    return text[:90]


def _worker(conn, check: Check, limit_memory: bool, init: Callable[[], None] | None):
    import resource

    warnings.simplefilter("ignore")  # readers warn on every odd value; outcomes are what is counted
    if init is not None:
        init()
    if limit_memory:  # a mutated size field must fail, not take the machine down
        try:  # relative to what the parent already maps: a forked pytest with CUDA torch maps tens of GB
            mapped = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            resource.setrlimit(resource.RLIMIT_AS, (mapped + (2 << 30), resource.RLIM_INFINITY))
        except (OSError, ValueError):
            pass
    while True:
        folder = conn.recv()
        if folder is None:
            return
        try:
            conn.send(check(Path(folder)))
        except BaseException as exc:  # noqa: BLE001 - MemoryError and the like: report, keep the worker
            conn.send(("crash", f"{type(exc).__name__}: {exc}", f"worker {type(exc).__name__}"))


class Runner:
    """One worker process, reused across cases and replaced when a case hangs. Spawned, not forked: a child
    forked from a process whose OpenMP/MKL threads already ran (pytest, after torch tests) can deadlock in its
    first FFT; ``check`` and ``init`` must therefore be importable module-level functions (or partials)."""

    def __init__(self, check: Check, limit_memory: bool = True, init: Callable[[], None] | None = None):
        self.ctx, self.proc = mp.get_context("spawn"), None
        self.args = (check, limit_memory, init)

    def _start(self):
        self.conn, child = self.ctx.Pipe()
        self.proc = self.ctx.Process(target=_worker, args=(child, *self.args), daemon=True)
        self.proc.start()

    def run(self, folder: Path, timeout: float):
        if self.proc is None or not self.proc.is_alive():
            self._start()
        self.conn.send(str(folder))
        if self.conn.poll(timeout):
            try:
                return self.conn.recv()
            except EOFError:
                pass
            self.proc = None
            return "crash", "worker died", "worker died"
        self.proc.kill()
        self.proc.join()
        self.proc = None
        return "hang", f"no answer within {timeout} s", ""

    def close(self):
        if self.proc is not None and self.proc.is_alive():
            self.conn.send(None)
            self.proc.join(5)


def run_fuzz(make_case: Callable[[Path, random.Random, bool], list[str]], check: Check, *, cases: int,
             seconds: float, seed: int, timeout: float, workdir: Path | None = None, limit_memory: bool = True,
             init: Callable[[], None] | None = None) -> dict:
    """``make_case(folder, rng, mutate)`` writes one case and returns its mutations; case 0 is unmutated and must
    come back ok (else the base itself is broken and the run stops)."""
    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp(prefix="fuzz_", dir=workdir))
    runner, counts, reasons, crashes = Runner(check, limit_memory, init), Counter(), Counter(), {}
    t0, n = time.time(), 0
    try:
        while n < cases and time.time() - t0 < seconds:
            folder = tmp / f"case{n:05d}"
            folder.mkdir()
            mutations = make_case(folder, rng, n > 0)
            outcome, detail, crash_class = runner.run(folder, timeout)
            counts[outcome] += 1
            if outcome == "failed":
                reasons[reason_class(detail)] += 1
            if outcome in ("crash", "hang"):
                crashes.setdefault(crash_class or outcome, {"count": 0, "example": {
                    "case": n, "mutations": mutations, "detail": detail[:300]}})["count"] += 1
            if n == 0 and outcome != "ok":
                raise RuntimeError(f"the unmutated base case does not pass: {detail}")
            shutil.rmtree(folder, ignore_errors=True)
            shutil.rmtree(folder.parent / (folder.name + "_out"), ignore_errors=True)
            n += 1
    finally:
        runner.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return {"cases": n, "seconds": round(time.time() - t0, 1), "seed": seed, "ok": counts["ok"],
            "failed": counts["failed"], "crashes": counts["crash"], "hangs": counts["hang"],
            "crash_classes": crashes, "failure_reasons": dict(reasons.most_common())}


def report(name: str, res: dict, reasons: bool = False) -> None:
    print(f"{name}: {res['cases']} cases in {res['seconds']} s (seed {res['seed']})")
    for key in ("ok", "failed", "crashes", "hangs"):
        print(f"  {key:<8}{res[key]:>6}")
    for crash_class, info in sorted(res["crash_classes"].items(), key=lambda kv: -kv[1]["count"]):
        ex = info["example"]
        print(f"  crash class {crash_class}: {info['count']} case(s); "
              f"e.g. case {ex['case']} {ex['mutations']}: {ex['detail']}")
    if reasons:
        for reason, count in res["failure_reasons"].items():
            print(f"  {count:>5}  {reason}")
