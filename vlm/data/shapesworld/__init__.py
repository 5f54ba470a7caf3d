"""ShapesWorld: deterministic scenes of coloured shapes in real data formats (see generator.py)."""

from .generator import ShapesWorldConfig, generate
from .questions import QTYPES

__all__ = ["QTYPES", "ShapesWorldConfig", "generate"]
