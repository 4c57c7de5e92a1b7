"""`asymsearch bench serve`: the server under load against the in-process limit, interleaved in one run.

1. Artifacts (`asymsearch.bench.artifacts`): real models by default — a zero-shot EfficientNet-Lite2 teacher at
   260 px and an EfficientNet-Lite0 student at its smaller size, exported through the export API, and an index of
   the database half of `--images` built with `build_index` — or the given `--student` with `--index` / `--teacher`.
2. The server: `asymsearch serve` in its own process (`asymsearch.bench.server`), loaded by client processes
   (`asymsearch.bench.loadgen`) over 127.0.0.1 at each concurrency, image and vector queries.
3. The limit (`asymsearch.bench.limit`): the same decode + student + faiss steps in this process, no gRPC.
4. Interleaving: each round runs every candidate (the limit, then the server at each concurrency; the order rotated
   each round) for `--seconds`, so a busy neighbour slows them alike; figures are medians over the rounds.
   Each candidate is reported as q/s and as process CPU ms per query: the server's CPU from its /metrics
   (`process_cpu_seconds_total`, or /proc/<pid>) over the search requests its /metrics counted; the limit's from
   this process's CPU time. On a shared machine the CPU figure is the steadier one.
   With `--compare-serve-args` (and/or `--compare-pythonpath`) a second server, "server B", runs beside the first
   and takes its own place in every round (`B c=N`), so two configurations or two versions of the code are told
   apart within one run on a busy machine; the targets are judged on the first server only.
5. The sanity check (`check_ratio`): a server/limit throughput ratio above `MAX_RATIO` is refused, never reported —
   a server cannot beat the work it does with nothing around it, so such a ratio means the limit is wrong.
6. Idle-stream resilience: with N SearchStream calls open and idle (held by another process), the latency of health
   checks and of vector queries, the server's threads before and during, and how many streams it refused.
7. Large images: N 16-bit greyscale PNGs of side S (a few KB each on the wire, side^2 x 2 bytes of pixels) sent at
   once while ordinary image queries go on: the server's RSS growth and those queries' latency meanwhile.

Writes JSON (with `provenance()`), a Markdown page beside it and a PNG.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import statistics
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from asymsearch.core.errors import UserError
from asymsearch.core.provenance import provenance
from asymsearch.core.timing import rotations

MAX_RATIO = 1.05  # server q/s over the limit's: above this the limit is wrong, not the server fast
LIMIT = "limit"
# the targets at concurrency 16 (issue 21)
TARGET_CONCURRENCY = 16
TARGET_CPU_RATIO = 1.10  # server CPU ms per query <= 1.10 x the limit's
TARGET_QPS_RATIO = 0.85  # server q/s >= 0.85 x the limit's
TARGET_IDLE_MS = 100.0  # health and a vector query answer within this with the idle streams open
TARGET_LARGE_RSS_MB = 300.0  # RSS growth with the large images in flight
TARGET_LARGE_WAIT_MS = 1000.0  # an ordinary query's latency meanwhile (unless the large ones were refused)


class LimitBeaten(UserError):
    """A server/limit ratio above `MAX_RATIO`: the limit does not measure what the server does."""


@dataclasses.dataclass
class ServeBenchConfig:
    images: Path  # query images (first half of the classes); the index is built from the second half
    workdir: Path = Path("bench-serve-work")
    out_json: Path = Path("docs/results/bench_serve.json")
    student: Path | None = None  # ONNX or checkpoint; None: the real models made here
    teacher: Path | None = None  # to build the index with (with --student and without --index)
    index: Path | None = None
    student_size: int | None = None  # the made Lite0 student's input (None: its own 224 px)
    concurrency: tuple[int, ...] = (1, 16)
    kinds: tuple[str, ...] = ("image", "vector")
    rounds: int = 3
    seconds: float = 5.0
    lead_s: float = 1.0  # client warm-up before each server window
    k: int = 10
    client_processes: int = 2
    query_images: int = 64
    limit_threads: int | None = None  # None: the server's decode + embed workers (bench.limit.default_threads)
    limit_batch: int = 8  # queries per faiss search in the limit
    limit_embed_batch: int = 1  # images per student call in the limit
    idle_streams: int = 1000  # 0: no idle-stream line
    large_images: int = 16  # 0: no large-image line
    large_side: int = 6300
    serve_args: tuple[str, ...] = ()  # passed to `asymsearch serve` as they are
    compare_serve_args: tuple[str, ...] | None = None  # a second server ("server B") with these arguments
    compare_pythonpath: str | None = None  # ... running the code found on this PYTHONPATH
    max_ratio: float = MAX_RATIO


# -- the sanity check ---------------------------------------------------------------------------------------------

def check_ratio(server_qps: float, limit_qps: float, *, max_ratio: float = MAX_RATIO, what: str = "") -> float:
    """server_qps / limit_qps, or `LimitBeaten` when it is above `max_ratio` (or the limit answered nothing)."""
    if not limit_qps > 0:
        raise LimitBeaten(f"{what}the in-process limit answered no query: no ratio can be reported")
    ratio = server_qps / limit_qps
    if ratio > max_ratio:
        raise LimitBeaten(f"{what}the server answered {ratio:.2f}x the in-process limit's q/s ({server_qps:.1f} vs "
                          f"{limit_qps:.1f}), above {max_ratio}: the limit does not measure what the server does, so "
                          f"no ratio is reported")
    return ratio


# -- rounds -------------------------------------------------------------------------------------------------------

def run_interleaved(candidates: dict[str, Callable[[], dict[str, Any]]], rounds: int,
                    log: Callable[[str], None] = print) -> dict[str, list[dict[str, Any]]]:
    """Run each candidate once per round, the order rotated each round (`core.timing.rotations`); returns each
    candidate's results in round order, each tagged with its round and its place in that round."""
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in candidates}
    for r, order in enumerate(rotations(list(candidates), rounds)):
        for place, name in enumerate(order):
            result = dict(candidates[name]())
            result.update(round=r, place=place)
            out[name].append(result)
            log(f"round {r + 1}/{rounds} {name:>14s}: {result['qps']:8.1f} q/s, "
                f"{result['cpu_ms_per_query']:7.2f} CPU ms/query"
                + (f", p50 {result['p50_ms']:.1f} ms, p99 {result['p99_ms']:.1f} ms" if "p99_ms" in result else "")
                + (f", errors {result['errors']}" if result.get("errors") else ""))
    return out


def median_of(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the rounds of q/s, CPU ms per query and latency percentiles; errors summed."""
    out: dict[str, Any] = {"rounds": len(runs)}
    for key in ("qps", "cpu_ms_per_query", "p50_ms", "p95_ms", "p99_ms"):
        values = [r[key] for r in runs if r.get(key) is not None]
        if values:
            out[key] = statistics.median(values)
    stages = {stage for r in runs for stage in r.get("stage_cpu_ms_per_query", {})}
    if stages:
        out["stage_cpu_ms_per_query"] = {stage: statistics.median(r.get("stage_cpu_ms_per_query", {}).get(stage, 0.0)
                                                                  for r in runs) for stage in sorted(stages)}
    errors: dict[str, int] = {}
    for r in runs:
        for code, n in (r.get("errors") or {}).items():
            errors[code] = errors.get(code, 0) + n
    out["errors"] = errors
    return out


def compare(medians: dict[str, dict[str, Any]], *, max_ratio: float = MAX_RATIO) -> dict[str, dict[str, Any]]:
    """For each server candidate: its q/s and CPU-per-query ratios to the limit's, or the refusal."""
    limit = medians[LIMIT]
    out = {}
    for name, m in medians.items():
        if name == LIMIT:
            continue
        row: dict[str, Any] = {"cpu_ratio": m["cpu_ms_per_query"] / limit["cpu_ms_per_query"]}
        try:
            row["qps_ratio"] = check_ratio(m["qps"], limit["qps"], max_ratio=max_ratio, what=f"{name}: ")
        except LimitBeaten as e:
            row["qps_ratio"], row["refused"] = None, str(e)
        out[name] = row
    return out


def _server_round(pool, server, kind: str, concurrency: int, payloads: list, cfg: ServeBenchConfig
                  ) -> dict[str, Any]:
    before = server.snapshot()
    result = pool.run(server.address, kind, concurrency, cfg.seconds, cfg.k, payloads, lead_s=cfg.lead_s)
    after = server.snapshot()
    if after[kind] is None:  # (before the first query of a kind the counter has no sample yet)
        raise UserError("the server's /metrics has no asymsearch_requests_total for "
                        f"method {kind} after a round of them: CPU per query cannot be measured")
    answered = after[kind] - (before[kind] or 0.0)
    lat = np.asarray(result["latencies"]) * 1e3
    out = {"qps": result["finished_in_window"] / result["duration"], "ok": result["codes"].get("OK", 0),
           "errors": {c: n for c, n in result["codes"].items() if c != "OK"},
           "cpu_ms_per_query": (after["cpu_s"] - before["cpu_s"]) * 1e3 / max(1.0, answered),
           "server_requests": answered, "cpu_source": after["cpu_source"], "rss_mb": after["rss_mb"],
           "stage_cpu_ms_per_query": {stage: (cpu - was) * 1e3 / max(1.0, answered)
                                      for stage, cpu in after["stage_cpu_s"].items()
                                      if cpu > (was := before["stage_cpu_s"].get(stage, 0.0))}}
    if len(lat):
        out.update({f"p{q}_ms": float(np.percentile(lat, q)) for q in (50, 95, 99)})
    return out


B_PREFIX = "B c="  # the second server's candidates


@contextlib.contextmanager
def _second_server(art, cfg: ServeBenchConfig):
    """Server B (`--compare-serve-args` / `--compare-pythonpath`), or None without one."""
    from asymsearch.bench.server import ServerProcess
    if cfg.compare_serve_args is None and cfg.compare_pythonpath is None:
        yield None
        return
    env = None
    if cfg.compare_pythonpath:
        if not Path(cfg.compare_pythonpath, "asymsearch").is_dir():
            raise UserError(f"--compare-pythonpath {cfg.compare_pythonpath} holds no asymsearch/ package folder")
        env = {**os.environ, "PYTHONPATH": str(cfg.compare_pythonpath)}
    with ServerProcess(art.index, art.student, serve_args=_gate_args(art, cfg.compare_serve_args or ()), env=env,
                       log_path=Path(cfg.workdir) / "server-b.log") as server_b:
        yield server_b


def _gate_args(art, serve_args: Sequence[str]) -> tuple[str, ...]:
    """The student made here is untrained (speed does not depend on the weights), so the index's probe set would
    refuse it at the quality gate: its servers run with `--min-ratio 0` unless the arguments set a ratio."""
    args = tuple(serve_args)
    if art.source.startswith("made here") and "--min-ratio" not in args:
        args = ("--min-ratio", "0", *args)
    return args


def query_vectors(student: Path, paths: Sequence[str]) -> list[list[float]]:
    """The student's embeddings of the query images: the payload of vector queries."""
    from asymsearch.core.ort import OnnxEmbedder
    from asymsearch.core.preprocess import decode_image
    return OnnxEmbedder(student).embed_images([decode_image(p) for p in paths]).tolist()


def run_bench(cfg: ServeBenchConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    from asymsearch.bench import artifacts
    from asymsearch.bench.limit import InProcessLimit
    from asymsearch.bench.loadgen import ClientPool
    from asymsearch.bench.server import IdleStreams, ServerProcess, deep_png, probe_large_images, probe_latency

    if cfg.rounds < 1 or cfg.seconds <= 0 or cfg.client_processes < 1 or not cfg.concurrency:
        raise UserError("rounds, seconds, client processes and the concurrency levels must be positive")
    bad = [k for k in cfg.kinds if k not in ("image", "vector")]
    if bad:
        raise UserError(f"unknown query kind {bad[0]!r}; use image and/or vector")
    art = artifacts.prepare(Path(cfg.workdir), images=Path(cfg.images), student=cfg.student, teacher=cfg.teacher,
                            index=cfg.index, student_size=cfg.student_size, query_images=cfg.query_images, log=log)
    vectors = query_vectors(art.student, art.query_paths)
    payloads = {"image": art.query_paths, "vector": vectors}
    report: dict[str, Any] = {
        "provenance": provenance(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()},
        "artifacts": {"source": art.source, "index": str(art.index), "student": str(art.student),
                      "teacher": str(art.teacher) if art.teacher else None, "query_images": len(art.query_paths),
                      "models": artifacts.describe([p for p in (art.teacher, art.student) if p])},
        "loadavg_start": os.getloadavg(), "kinds": {}}
    log(f"artifacts ({art.source}): index {art.index}, student {art.student}, {len(art.query_paths)} query images")
    with InProcessLimit(art.index, art.student, threads=cfg.limit_threads, batch=cfg.limit_batch,
                        embed_batch=cfg.limit_embed_batch, k=cfg.k) as limit, \
            ClientPool(cfg.client_processes) as pool, \
            ServerProcess(art.index, art.student, serve_args=_gate_args(art, cfg.serve_args),
                          log_path=Path(cfg.workdir) / "server.log") as server, \
            _second_server(art, cfg) as server_b:
        report["index"] = {"count": limit.index.count, "dim": limit.index.dim, "factory": limit.index.manifest.factory}
        report["limit_settings"] = {"threads": limit.threads, "batch": limit.batch,
                                    "embed_batch": limit.embed_batch, "faiss_threads": 1,
                                    "onnxruntime_threads_per_call": 1}
        report["server"] = {"command": server.command, "start": server.snapshot()}
        if server_b is not None:
            report["server_b"] = {"command": server_b.command, "pythonpath": cfg.compare_pythonpath,
                                  "start": server_b.snapshot()}
        for kind in cfg.kinds:
            candidates: dict[str, Callable[[], dict[str, Any]]] = {
                LIMIT: lambda kind=kind: limit.run(kind, payloads[kind], cfg.seconds)}
            for c in cfg.concurrency:
                candidates[f"server c={c}"] = (lambda kind=kind, c=c: _server_round(pool, server, kind, c,
                                                                                     payloads[kind], cfg))
                if server_b is not None:
                    candidates[f"{B_PREFIX}{c}"] = (lambda kind=kind, c=c: _server_round(
                        pool, server_b, kind, c, payloads[kind], cfg))
            log(f"{kind} queries: {cfg.rounds} interleaved rounds of {', '.join(candidates)}, {cfg.seconds:g} s each")
            runs = run_interleaved(candidates, cfg.rounds, log=log)
            medians = {name: median_of(r) for name, r in runs.items()}
            report["kinds"][kind] = {"runs": runs, "medians": medians,
                                     "vs_limit": compare(medians, max_ratio=cfg.max_ratio)}
        if cfg.idle_streams:
            threads_before = server.threads()
            log(f"opening {cfg.idle_streams} idle SearchStream calls")
            with IdleStreams(server.address, cfg.idle_streams) as idle:
                during = server.snapshot()
                probes = probe_latency(server, vectors[0])
            report["idle_streams"] = {"requested": cfg.idle_streams, "opened": idle.opened, "refused": idle.refused,
                                      "server_open_streams": during["open_streams"],
                                      "server_threads_before": threads_before,
                                      "server_threads_during": during["threads"], **probes}
        if cfg.large_images:
            log(f"sending {cfg.large_images} 16-bit {cfg.large_side}x{cfg.large_side} PNGs at once")
            normal = Path(payloads["image"][0]).read_bytes()
            report["large_images"] = {"side": cfg.large_side, **probe_large_images(
                server, deep_png(cfg.large_side), normal, count=cfg.large_images)}
        report["server"]["end"] = server.snapshot()
        if server_b is not None:
            report["server_b"]["end"] = server_b.snapshot()
            report["server_b"]["exit_code"] = server_b.stop()
        report["server"]["exit_code"] = server.stop()
    report["loadavg_end"] = os.getloadavg()
    report["targets"] = targets(report)
    write_report(report, Path(cfg.out_json))
    return report


# -- the targets and the report ---------------------------------------------------------------------------

def targets(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    image = report["kinds"].get("image", {}).get("vs_limit", {}).get(f"server c={TARGET_CONCURRENCY}")
    if image:
        out["image_c16_cpu_per_query"] = {"target": f"<= {TARGET_CPU_RATIO} x the limit's",
                                          "measured": round(image["cpu_ratio"], 3),
                                          "met": image["cpu_ratio"] <= TARGET_CPU_RATIO}
        out["image_c16_qps"] = {"target": f">= {TARGET_QPS_RATIO} x the limit's",
                                "measured": None if image["qps_ratio"] is None else round(image["qps_ratio"], 3),
                                "met": image["qps_ratio"] is not None and image["qps_ratio"] >= TARGET_QPS_RATIO,
                                **({"refused": image["refused"]} if "refused" in image else {})}
    idle = report.get("idle_streams")
    if idle:
        worst = [idle[n]["max_ms"] for n in ("health", "vector")]
        failed = any(idle[n]["errors"] for n in ("health", "vector")) or None in worst
        out["idle_streams"] = {"target": f"health and a vector query < {TARGET_IDLE_MS:.0f} ms with "
                                         f"{idle['requested']} idle streams open",
                               "measured": {"health_max_ms": None if worst[0] is None else round(worst[0], 1),
                                            "vector_max_ms": None if worst[1] is None else round(worst[1], 1),
                                            "opened": idle["opened"]},
                               "met": not failed and max(worst) < TARGET_IDLE_MS
                               and idle["opened"] == idle["requested"]}
    large = report.get("large_images")
    if large:
        refused = large["outcomes"].get("OK", 0) == 0
        out["large_images"] = {"target": f"{large['count']} 16-bit {large['side']}^2 PNGs in flight: RSS growth < "
                                         f"{TARGET_LARGE_RSS_MB:.0f} MB and an ordinary query waits < "
                                         f"{TARGET_LARGE_WAIT_MS:.0f} ms (or the large ones are refused)",
                               "measured": {"rss_growth_mb": large["rss_growth_mb"],
                                            "normal_max_ms": large["normal_max_ms"], "outcomes": large["outcomes"]},
                               "met": large["rss_growth_mb"] < TARGET_LARGE_RSS_MB and (
                                   refused or (large["normal_max_ms"] or 0) < TARGET_LARGE_WAIT_MS)}
    return out


def refusals(report: dict[str, Any]) -> list[str]:
    return [row["refused"] for kind in report["kinds"].values() for row in kind["vs_limit"].values()
            if "refused" in row]


def _f(value: Any, fmt: str = ".1f") -> str:
    return "-" if value is None else format(value, fmt)


def markdown(report: dict[str, Any], png_name: str | None = None) -> str:
    p = report["provenance"]
    m = p.get("machine") or {}
    s = report["settings"]
    lines = ["# bench serve: the gRPC server under load vs the in-process limit, interleaved", "",
             f"Command: `{p.get('command')}`  ",
             f"Commit {p.get('commit')}{' (with uncommitted changes)' if p.get('dirty') else ''}, {p.get('date')}, "
             f"{m.get('cores')} cores ({m.get('cpu')}), {m.get('ram_gb')} GB RAM, GPUs: {m.get('gpu') or 'none'}; "
             f"load average {report['loadavg_start'][0]:.1f} at the start, {report['loadavg_end'][0]:.1f} at the "
             f"end (a shared machine: compare within this run; CPU ms per query is the steadier figure).  ",
             f"Models: {report['artifacts']['source']}; "
             + "; ".join(f"{d['role']} {d['architecture'].get('backbone')} at {d['input_size']} px"
                         for d in report["artifacts"]["models"].values())
             + f". Index: {report['index']['count']} items, dim {report['index']['dim']}, "
               f"`{report['index']['factory']}`; {report['artifacts']['query_images']} query images.  ",
             f"Server: `{' '.join(report['server']['command'][3:])}`.  ",
             *([f"Server B (candidates `{B_PREFIX}N`): `{' '.join(report['server_b']['command'][3:])}`"
                + (f", code from PYTHONPATH `{report['server_b']['pythonpath']}`" if report['server_b'].get('pythonpath')
                   else "") + ".  "] if report.get("server_b") else []),
             f"Limit: the same decode + student + faiss steps in the benchmark's process, no gRPC, "
             f"{report['limit_settings']['threads']} worker threads, each searching "
             f"{report['limit_settings']['batch']} queries per faiss call and embedding "
             f"{report['limit_settings'].get('embed_batch', 1)} image(s) per student call."
             f"  ", f"{s['rounds']} interleaved rounds of {s['seconds']:g} s per candidate, medians; "
                    f"{s['client_processes']} client processes.", ""]
    if png_name:
        lines += [f"![q/s and CPU per query]({png_name})", ""]
    for kind, data in report["kinds"].items():
        lines += [f"## {kind} queries", "",
                  "| candidate | q/s | CPU ms/query | q/s vs limit | CPU/query vs limit | p50 ms | p99 ms | errors |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, med in data["medians"].items():
            vs = data["vs_limit"].get(name, {})
            ratio = "refused" if "refused" in vs else _f(vs.get("qps_ratio"), ".2f") if vs else "1"
            lines.append(f"| {name} | {_f(med.get('qps'))} | {_f(med.get('cpu_ms_per_query'), '.2f')} | {ratio} | "
                         f"{_f(vs.get('cpu_ratio'), '.2f') if vs else '1'} | {_f(med.get('p50_ms'))} | "
                         f"{_f(med.get('p99_ms'))} | {sum(med['errors'].values())} |")
        for name, vs in data["vs_limit"].items():
            if "refused" in vs:
                lines += ["", f"**Refused:** {vs['refused']}"]
        lines += [""] + stage_table(data["medians"])
    idle = report.get("idle_streams")
    if idle:
        lines += ["## Idle streams", "",
                  f"{idle['opened']} of {idle['requested']} SearchStream calls open and idle (refused: "
                  f"{idle['refused'] or 'none'}; the server counted {_f(idle['server_open_streams'], '.0f')} open); "
                  f"server threads {idle['server_threads_before']} before, {idle['server_threads_during']} during.",
                  "", "| call | answered | p50 ms | max ms | errors |", "|---|---|---|---|---|"]
        for name in ("health", "vector"):
            r = idle[name]
            lines.append(f"| {name} | {r['ok']} | {_f(r['p50_ms'])} | {_f(r['max_ms'])} | {r['errors'] or '-'} |")
        lines.append("")
    large = report.get("large_images")
    if large:
        lines += ["## Large images", "",
                  f"{large['count']} 16-bit greyscale {large['side']}x{large['side']} PNGs ({large['image_bytes']:,} "
                  f"bytes each) sent at once: {large['outcomes']}. Server RSS {large['rss_before_mb']:.0f} MB before, "
                  f"{large['rss_peak_mb']:.0f} MB at its peak (+{large['rss_growth_mb']:.0f} MB); {large['normal_queries']} "
                  f"ordinary image queries meanwhile, p50 {_f(large['normal_p50_ms'])} ms, max "
                  f"{_f(large['normal_max_ms'])} ms.", ""]
    start, end = report["server"]["start"], report["server"]["end"]
    lines += [f"Server RSS {start['rss_mb']:.0f} MB at the start, {end['rss_mb']:.0f} MB at the end; "
              f"CPU from {end['cpu_source']}; exit status after SIGTERM {report['server'].get('exit_code')}.", "",
              "## Targets (issue 21)", "", "| target | measured | met |", "|---|---|---|"]
    for name, t in report["targets"].items():
        lines.append(f"| {name}: {t['target']} | `{json.dumps(t['measured'])}` | {'yes' if t['met'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def stage_table(medians: dict[str, dict[str, Any]]) -> list[str]:
    """Where each candidate's CPU per query goes: the thread CPU of decode, embed and search (what the server exports
    as asymsearch_stage_cpu_seconds, and the limit counts the same way) and the rest of the process CPU (in the
    server: gRPC, asyncio, admission and the hand-offs between threads). Empty when no candidate has the stages."""
    from asymsearch.bench.server import STAGES
    rows = [(name, m) for name, m in medians.items() if m.get("stage_cpu_ms_per_query")]
    if not rows:
        return []
    lines = ["Where the CPU goes (CPU ms per query, medians of the rounds; stages by thread CPU time, \"rest\" = "
             "process CPU minus the stages):", "", "| candidate | " + " | ".join(STAGES) + " | rest | total |",
             "|---" * (len(STAGES) + 3) + "|"]
    for name, m in rows:
        stages = m["stage_cpu_ms_per_query"]
        rest = m["cpu_ms_per_query"] - sum(stages.get(s, 0.0) for s in STAGES)
        lines.append(f"| {name} | " + " | ".join(_f(stages.get(s), ".2f") for s in STAGES)
                     + f" | {rest:.2f} | {m['cpu_ms_per_query']:.2f} |")
    return lines + [""]


def plot(report: dict[str, Any], path: Path) -> None:
    """One row per query kind: q/s and process CPU ms per query of each candidate (medians of the rounds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(report["kinds"])
    fig, axes = plt.subplots(len(kinds), 2, figsize=(10, 3.2 * len(kinds)), squeeze=False)
    for row, kind in zip(axes, kinds):
        medians = report["kinds"][kind]["medians"]
        names = list(medians)
        colours = ["tab:gray" if n == LIMIT else "tab:blue" for n in names]
        for ax, key, label in zip(row, ("qps", "cpu_ms_per_query"), ("queries / s", "process CPU ms / query")):
            ax.bar(names, [medians[n].get(key, np.nan) for n in names], color=colours)
            ax.set_ylabel(f"{kind}: {label}")
            ax.grid(True, axis="y", alpha=0.3)
            ax.tick_params(axis="x", labelsize=8)
    m = report["provenance"].get("machine") or {}
    fig.suptitle(f"asymsearch bench serve: server vs in-process limit, medians of {report['settings']['rounds']} "
                 f"interleaved rounds ({m.get('cores')} cores, index {report['index']['count']} items)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], out_json: Path) -> None:
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(report, indent=2, default=str) + "\n")
    png = out_json.with_suffix(".png")
    plot(report, png)
    out_json.with_suffix(".md").write_text(markdown(report, png.name))
