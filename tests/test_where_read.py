"""``experiments/llava/where_read.py``, the diagnosis of where an answer is read from, runs on a
trained checkpoint and the data set's own files."""

import importlib.util
import json
import re
from collections import Counter
from pathlib import Path

from runs import shapesworld_root


def test_where_read_diagnoses_the_trained_checkpoint(trained_run, shapesworld, capsys):
    """experiments/llava/where_read.py runs on a real checkpoint and the data set's own files."""
    spec = importlib.util.spec_from_file_location(
        "where_read", Path(__file__).parents[1] / "experiments/llava/where_read.py"
    )
    where_read = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(where_read)
    out, _ = trained_run
    root = shapesworld_root(shapesworld)
    where_read.main(str(out / "checkpoints" / "last.ckpt"), str(root))
    lines = capsys.readouterr().out.strip().splitlines()
    asked = Counter(r["qtype"] for r in json.loads((root / "llava_val.json").read_text()))
    want = [f"{qt} (n={asked[qt]})" for qt in where_read.QTYPES if asked[qt]]
    assert [line.split(":")[0] for line in lines[:-1]] == want
    for line in lines[:-1]:
        accs = re.fullmatch(r".*: all tokens (\S+), named only (\S+), all but named (\S+)", line).groups()
        assert all(0.0 <= float(a) <= 1.0 for a in accs)
    assert re.fullmatch(
        r"x from the centre token \(\d+ held-out objects\): R² -?\d+\.\d\d, half \d\.\d\d", lines[-1]
    )
