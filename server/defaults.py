"""The server's defaults that depend on the machine, in one light module (the command line's --help reads it
without loading the server). Measured values and their sources are in docs/server.md."""
from __future__ import annotations

import os


def machine_cores() -> int:
    """Cores this process may run on (its CPU affinity, which containers and `taskset` narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def machine_ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


CORES = machine_cores()
# The student is most of an image query's CPU (onnxruntime: 64% of the server's samples in a py-spy profile at
# concurrency 16): one embed worker per core (two or more where cores allow), each running onnxruntime with one
# intra-op thread, so the student is not capped at one core.
EMBED_WORKERS = max(1, min(4, CORES))  # student calls running side by side
# images per student call: batching the Lite0 student buys no CPU here (17.8 CPU ms per image alone, 20.6 in a
# batch of 16, docs/results/bench_embed.md), and onnxruntime keeps the memory of its largest batch
EMBED_BATCH = 4
# Pillow threads decoding and preprocessing: the cores the embed workers leave, at least one. Measured with the
# real Lite0 student on 2 cores (bench serve, image queries at concurrency 16): 2 decoders beside 2 embed workers
# cost 1.27x the in-process limit's CPU per query, 1 decoder 1.10x-1.17x (fewer threads time-sliced over the cores).
DECODE_WORKERS = max(1, CORES - EMBED_WORKERS)
MAX_QUEUE = 2048  # queries admitted at once (BatchSearch's max_batch_queries must fit in it)
MEMORY_BUDGET_BYTES = machine_ram_bytes() // 4  # what the admitted queries may occupy

MAX_BATCH_QUERIES = 1024  # queries one BatchSearch call may carry
MAX_CONCURRENT_STREAMS = 256  # HTTP/2 streams per connection; a client beyond it waits, it is not refused
MAX_STREAMS = 4096  # SearchStream calls open at once, all connections together
MAX_CALLS_PER_PEER = 2048  # Search calls in progress from one client address (1,000 idle streams fit)
STREAM_IDLE_S = 60.0  # a stream with no query in progress for this long is closed
