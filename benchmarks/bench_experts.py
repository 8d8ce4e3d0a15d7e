"""Benchmark moekit's experts against their peers (transformers, ScatterMoE) in one process.

    PYTHONPATH=src python benchmarks/bench_experts.py --out benchmarks/results --peers .peers

See ``moekit.benchmark`` (and docs/performance.md) for what is measured and how.
"""

import sys

from moekit.benchmark import main

if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
