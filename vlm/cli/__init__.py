"""Console entry points; every one is a Hydra app over the ``conf/`` tree."""

from pathlib import Path

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
