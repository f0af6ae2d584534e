"""The benchmark run: build the workload, check equality, time every contender interleaved, write latest.json."""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch

from mlalign.bench import __doc__ as PACKAGE_DOC
from mlalign.bench.contenders import (analysis_metrics, build_saelens_model, compare, naive_layers, run_analyze,
                                      run_analyze_dense, run_analyze_nofeatures, run_analyze_nowindow, run_floor, run_forward, run_naive,
                                      run_reference, run_saelens, run_trunk)
from mlalign.bench.memory import PeakMemory, minor_page_faults, rss_probe, run_rss_probes, timed
from mlalign.bench.report import _device_name, print_table
from mlalign.bench.training import build_training, train_step, usable_objectives
from mlalign.bench.workload import SHAPES, build_bench, settings_from_args


def set_threads(requested: int, device: str) -> int:
    """Intra-op threads: 1 on a CPU by default. The benchmark's matrices are small (256 wide); on a shared 2-core box
    two threads spin-wait on each other and on other jobs, which makes medians noisy and often slower."""
    threads = requested if requested > 0 else (1 if device == "cpu" else torch.get_num_threads())
    torch.set_num_threads(threads)
    return threads


def run_benchmark(args) -> dict:
    """build the workload -> warm up and check equality -> time every contender interleaved -> time the training
    steps -> RSS probes -> latest.json's record."""
    started = time.perf_counter()
    settings, bench = _build(args)
    s = settings
    tl_model, saelens_error = _saelens_peer(bench, args)
    equality, tl_model, saelens_error = _warm_up_and_check(bench, tl_model, saelens_error)
    # Every naive pass is the same work (a full forward plus one layer's SAE), so its time is linear in the number of
    # layers: timing a spread of them and scaling is exact up to noise, and keeps the benchmark to minutes.
    measured_layers = naive_layers(s.shape.layers, s.naive_layers)
    timings = _Timings(s.device)
    for repeat in range(s.repeats):
        _time_contenders(timings, bench, tl_model, naive=repeat < s.naive_repeats and not (args.analysis_only
                                                                                         or args.no_naive),
                         measured_layers=measured_layers)
        print(f"repeat {repeat + 1}/{s.repeats}: " + ", ".join(f"{k}={v[-1]:.3f}" for k, v in timings.times.items()
                                                                if v), flush=True)
    del tl_model
    gc.collect()
    steps, step_impl = _time_training(bench, s, args)
    rss = run_rss_probes(args, settings) if not args.no_rss else None
    result = _result(s, bench, timings, steps, measured_layers)
    result.update({
        "rss_growth_pct": None if rss is None else rss["rss_growth_pct"],
        "rss": rss,
        "saelens_error": saelens_error,
        "train_step_impl": step_impl,
        "equality": equality,
        "minor_page_faults": {key: statistics.median(v) if v else None for key, v in timings.faults.items()},
        "raw": {**timings.times, **steps, **timings.peaks, "minor_page_faults": timings.faults},
        "total_s": time.perf_counter() - started,
    })
    if s.shape.name == "gemma2-2b":
        result["whole_corpus_10_langs_estimate_s"] = 10 * 1004 * (bench.n_tokens / sum(
            len(t) for t in bench.texts.values())) / result["tokens_per_s"]["analyze"]
    return result


def _build(args):
    """(settings, bench): the workload the arguments describe, said on the console."""
    settings = settings_from_args(args)
    settings.threads = set_threads(args.threads, args.device)
    s = settings
    print(f"benchmark: shape={s.shape.name} device={s.device} torch {torch.__version__} threads={s.threads} "
          f"langs={len(s.langs)} sentences/lang={s.sentences_per_lang} repeats={s.repeats}", flush=True)
    started = time.perf_counter()
    bench = build_bench(settings)
    print(f"built: {bench.n_tokens} analysed tokens, {s.shape.layers} layers, SAE width {s.shape.sae_width} "
          f"({time.perf_counter() - started:.1f}s)", flush=True)
    return settings, bench


def _saelens_peer(bench, args):
    """(sae-lens's HookedSAETransformer or None, why not or None)."""
    tl_model, saelens_error = None, "skipped (--analysis-only)" if args.analysis_only else None
    try:
        tl_model = None if args.analysis_only else build_saelens_model(bench)
    except Exception as err:  # a peer that cannot be built is a finding, not a crash
        saelens_error = f"{type(err).__name__}: {err}"
        print(f"sae-lens HookedSAETransformer could not be built: {saelens_error}", flush=True)
    return tl_model, saelens_error


def _warm_up_and_check(bench, tl_model, saelens_error):
    """Warm-up (allocator, lazy inits) of every contender and the equality check of the analysis against the
    reference; returns (equality, the sae-lens peer or None where its run failed, why)."""
    run_forward(bench)
    run_trunk(bench)
    run_floor(bench)
    run_analyze_dense(bench)
    run_analyze_nofeatures(bench)
    run_analyze_nowindow(bench)
    stats = run_analyze(bench)
    equality = compare(analysis_metrics(stats), run_reference(bench).metrics())
    print(f"equality: max relative difference {equality['max_rel_diff']:.2e} ({equality['where']}) -> "
          f"{'ok' if equality['passed'] else 'FAILED'}", flush=True)
    if tl_model is not None:
        try:
            run_saelens(bench, tl_model)
        except Exception as err:
            saelens_error = f"{type(err).__name__}: {err}"
            print(f"sae-lens run_with_cache_with_saes failed: {saelens_error}", flush=True)
            tl_model = None
    return equality, tl_model, saelens_error


class _Timings:
    """Every contender's times per repeat, the analysis' and sae-lens's memory peaks, and the minor page faults each
    timing took."""

    def __init__(self, device: str):
        self.device = device
        self.times: dict[str, list[float]] = {"forward_s": [], "trunk_s": [], "floor_s": [], "analyze_s": [],
                                              "analyze_dense_s": [], "analyze_nofeatures_s": [],
                                              "analyze_nowindow_s": [], "naive_s": [], "saelens_s": []}
        self.peaks: dict[str, list[float]] = {"analyze_peak_mb": [], "saelens_peak_mb": [], "analyze_peak_abs_mb": [],
                                              "saelens_peak_abs_mb": []}
        self.faults: dict[str, list[int]] = {key: [] for key in self.times}

    def measure(self, key: str, fn, *fn_args, scale: float = 1.0) -> None:
        """Time one contender; also count the minor page faults it took (fresh memory from the kernel): they cost
        seconds on the CPU and depend on the allocator's state, not on the contender's arithmetic."""
        before = minor_page_faults()
        self.times[key].append(scale * timed(self.device, fn, *fn_args)[0])
        self.faults[key].append(minor_page_faults() - before)

    def measure_peak(self, key: str, name: str, fn, *fn_args) -> None:
        """`measure`, and the memory peak under `<name>_peak_mb` and `<name>_peak_abs_mb`."""
        with PeakMemory(self.device) as mem:
            self.measure(key, fn, *fn_args)
        self.peaks[f"{name}_peak_mb"].append(mem.peak_mb)
        self.peaks[f"{name}_peak_abs_mb"].append(mem.peak_abs_mb)


def _time_contenders(timings: _Timings, bench, tl_model, naive: bool, measured_layers: list[int]) -> None:
    """One repeat: every contender once, interleaved (the naive path on `measured_layers`, scaled to all)."""
    timings.measure("forward_s", run_forward, bench)
    timings.measure("trunk_s", run_trunk, bench)
    timings.measure("floor_s", run_floor, bench)
    timings.measure_peak("analyze_s", "analyze", run_analyze, bench)
    timings.measure("analyze_dense_s", run_analyze_dense, bench)
    timings.measure("analyze_nofeatures_s", run_analyze_nofeatures, bench)
    timings.measure("analyze_nowindow_s", run_analyze_nowindow, bench)
    if tl_model is not None:
        timings.measure_peak("saelens_s", "saelens", run_saelens, bench, tl_model)
    if naive:
        timings.measure("naive_s", run_naive, bench, measured_layers,
                        scale=bench.settings.shape.layers / len(measured_layers))


def _time_training(bench, s, args) -> tuple[dict[str, list[float]], dict]:
    """({plain,act,full}_step_s: times per step}, the objectives' implementations or why skipped)."""
    names = {"plain_step_s": "plain", "act_step_s": "act", "full_step_s": "full"}
    steps = {key: [] for key in names}
    step_impl = {"all": "skipped (--analysis-only / --no-train)"}
    if not (args.analysis_only or args.no_train):
        training = build_training(bench)
        step_impl = usable_objectives(training)  # also the warm-up step of each
        for step in range(s.train_steps):
            for key, name in names.items():
                if name in training[5]:
                    steps[key].append(timed(s.device, train_step, training, name, step + 1)[0])
        del training
        gc.collect()
    return steps, step_impl


def _result(s, bench, timings: _Timings, steps: dict, measured_layers: list[int]) -> dict:
    """latest.json's record up to the memory peaks: when and where it ran, the settings, the medians, their ratios
    and the median peaks."""
    med = {k: statistics.median(v) if v else None for k, v in {**timings.times, **steps}.items()}

    def ratio(a, b):
        return None if med.get(a) is None or med.get(b) is None else med[a] / med[b]

    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": _device_name(s.device),
        "torch": torch.__version__,
        "torch_threads": s.threads,
        "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0],
        "settings": {**{k: v for k, v in asdict(s).items() if k != "shape"}, "shape": asdict(s.shape)},
        "analysed_tokens": bench.n_tokens,
        "sentences": sum(len(t) for t in bench.texts.values()),
        **med,
        "tokens_per_s": {"forward": bench.n_tokens / med["forward_s"], "analyze": bench.n_tokens / med["analyze_s"]},
        "analyze_over_forward": ratio("analyze_s", "forward_s"),
        "analyze_over_trunk": ratio("analyze_s", "trunk_s"),
        "analyze_over_floor": ratio("analyze_s", "floor_s"),
        "floor_over_forward": ratio("floor_s", "forward_s"),
        "dense_decode_over_analyze": ratio("analyze_dense_s", "analyze_s"),
        "features_cost_pct": None if ratio("analyze_s", "analyze_nofeatures_s") is None
        else 100.0 * (ratio("analyze_s", "analyze_nofeatures_s") - 1.0),
        "window_cost_pct": None if ratio("analyze_s", "analyze_nowindow_s") is None
        else 100.0 * (ratio("analyze_s", "analyze_nowindow_s") - 1.0),
        "naive_layers_timed": measured_layers,
        "naive_over_analyze": ratio("naive_s", "analyze_s"),
        "saelens_over_analyze": ratio("saelens_s", "analyze_s"),
        "saelens_over_floor": ratio("saelens_s", "floor_s"),
        "act_over_plain_step": ratio("act_step_s", "plain_step_s"),
        "full_over_plain_step": ratio("full_step_s", "plain_step_s"),
        **{k: statistics.median(v) if v else None for k, v in timings.peaks.items()},
    }


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(prog="python -m mlalign.bench", description=PACKAGE_DOC.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model and corpus (seconds), for the test suite")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--shape", default="cpu", choices=[k for k in SHAPES if k != "quick"])
    parser.add_argument("--sentences", type=int, default=26, help="sentences per language (10 languages; 26 = ~15k tokens)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-repeats", type=int, default=1, help="the naive path is ~26x slower: fewer repeats")
    parser.add_argument("--naive-layers", type=int, default=2, help="layers the naive path is timed on (0: all)")
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: 1 on cpu)")
    parser.add_argument("--no-rss", action="store_true", help="skip the 100 vs 1000 sentence RSS subprocesses")
    parser.add_argument("--analysis-only", action="store_true",
                        help="time only the floors and the analysis (no naive, sae-lens or training contenders)")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive per-layer baseline (the slowest)")
    parser.add_argument("--no-train", action="store_true", help="skip the LoRA training-step contenders")
    parser.add_argument("--out", default="outputs/bench/latest.json")
    parser.add_argument("--rss-probe", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.rss_probe:
        settings = settings_from_args(args)
        settings.threads = set_threads(args.threads, args.device)
        print(json.dumps(rss_probe(settings, args.rss_probe)))
        return None
    result = run_benchmark(args)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float))
    print_table(result)
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
