"""Load-testing harness for Loom and comparison peers (issue 6).

- `python -m loadtests.serve`  drive one OpenAI-compatible server with a workload, report vLLM-style metrics
- `python -m loadtests.sweep`  the standard sweep: Loom against every available peer, writes BENCHMARKS.md
- `python -m loadtests.soak`   a fixed-rate soak against a running server; checks RSS stays flat and KV blocks return
- `loadtests.peers`            registry of peers (name -> command, readiness URL, model id), started/stopped here

Nothing here is product code: the peers under `loadtests/peers/` are deliberately minimal baselines.
"""
