"""Benchmark data: the IJB-B/C file layout (real data and synthetic share one loader) and the
seeded synthetic surveillance benchmark."""

from fusedset.data.ijb import IJBMeta, MetaFileError, read_features, read_meta, write_benchmark
from fusedset.data.synthetic import SynthBenchmark, SynthConfig, generate

__all__ = [
    "IJBMeta",
    "MetaFileError",
    "SynthBenchmark",
    "SynthConfig",
    "generate",
    "read_features",
    "read_meta",
    "write_benchmark",
]
