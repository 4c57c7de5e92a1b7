"""Speed measurement of every stage, beside the product and never imported by it.

- `asymsearch.bench.embed`: `asymsearch bench embed`, torch eager vs onnxruntime, teacher vs student vs int8.
- `asymsearch.bench.index`: `asymsearch bench index`, teacher embedding throughput and faiss index types.
- `asymsearch.bench.serve`: `asymsearch bench serve`, the server (`asymsearch serve` in its own process) under
  load from `asymsearch.bench.loadgen`, interleaved with the in-process limit of the same pipeline.

Benchmarks build their artifacts through the stages' public APIs (`export_checkpoint`, `build_index`), read a
server's figures from its Prometheus endpoint, time candidates interleaved (`asymsearch.core.timing`), report
process CPU time beside throughput, and record `asymsearch.core.provenance.provenance()` in every results JSON.
"""
