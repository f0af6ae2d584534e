"""Timing and memory measurement: synchronised wall time, peak memory (CUDA allocator or sampled RSS), and the
fresh-process RSS probes that show whether analysis memory grows with the corpus."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import resource
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import torch

from mlalign.bench.contenders import run_analyze
from mlalign.bench.workload import Settings, build_bench

def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak memory above the start of the block: CUDA allocator peak on a GPU, sampled RSS on the CPU."""

    def __init__(self, device: str):
        self.device = device
        self.peak_mb = float("nan")

    def __enter__(self):
        gc.collect()
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        self.start = _rss_bytes()
        self.peak = self.start
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.002):
                self.peak = max(self.peak, _rss_bytes())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            self.peak_mb = (torch.cuda.max_memory_allocated() - self.start) / 2**20
            self.peak_abs_mb = torch.cuda.max_memory_allocated() / 2**20
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())
        self.peak_mb = (self.peak - self.start) / 2**20
        self.peak_abs_mb = self.peak / 2**20


def timed(device: str, fn, *args):
    _sync(device)
    start = time.perf_counter()
    out = fn(*args)
    _sync(device)
    return time.perf_counter() - start, out


def minor_page_faults() -> int:
    """This process's minor page faults so far (each a page of fresh memory from the kernel); 0 where unknown."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return 0
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so that it covers only what follows; False where that is unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_probe(settings: Settings, n_sentences: int) -> dict:
    """Run in a fresh process: build the benchmark, analyse `n_sentences` (spread over the languages), report the
    peak RSS of the analysis alone (the build's own peak, e.g. BPE training, is cleared first)."""
    per_lang = max(1, n_sentences // len(settings.langs))
    settings = replace(settings, max_length=settings.rss_max_length)
    bench = build_bench(settings, per_lang=per_lang)
    gc.collect()
    before = _rss_bytes()
    with PeakMemory("cpu") as sampled:  # a second opinion where VmHWM cannot be reset
        reset = _reset_peak_rss()
        run_analyze(bench)
    peak = _peak_rss_bytes() if reset else sampled.peak
    return {"sentences": per_lang * len(settings.langs), "tokens": bench.n_tokens, "rss_before_mb": before / 2**20,
            "peak_rss_mb": peak / 2**20, "peak_source": "VmHWM after clear_refs" if reset else "sampled every 2 ms"}


def run_rss_probes(args, settings: Settings) -> dict:
    results = []
    for n in settings.rss_sentences:
        cmd = [sys.executable, "-m", "mlalign.bench", "--rss-probe", str(n), "--device", args.device,
               "--shape", args.shape, "--threads", str(settings.threads)] + (["--quick"] if args.quick else [])
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"RSS probe for {n} sentences failed:\n{done.stderr[-3000:]}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    small, large = results
    return {"small": small, "large": large,
            "rss_growth_pct": 100.0 * (large["peak_rss_mb"] - small["peak_rss_mb"]) / small["peak_rss_mb"],
            "growth_mb": large["peak_rss_mb"] - small["peak_rss_mb"]}
