"""What every entry point shares, set up on import, before ``@hydra.main`` composes anything:
where ``conf/`` lives, the structured-config schemas, and ``PROJECT_ROOT`` (``paths.root_dir``),
so runs land in the repository's ``logs/`` whatever the working directory.

    from vlm.cli.common import CONFIG_DIR

    @hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
    def main(cfg: DictConfig) -> None: ...
"""

import os
from pathlib import Path

from vlm.core.schema import register_schemas

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = str(PROJECT_ROOT / "conf")

os.environ.setdefault("PROJECT_ROOT", str(PROJECT_ROOT))
register_schemas()
