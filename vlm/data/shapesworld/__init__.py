"""ShapesWorld: deterministic scenes of coloured shapes in real data formats (see generator.py)."""

from .benchmarks import BENCHMARKS, benchmark_root
from .generator import ShapesWorldConfig, generate
from .questions import QTYPES

__all__ = ["BENCHMARKS", "QTYPES", "benchmark_root", "ShapesWorldConfig", "generate"]
