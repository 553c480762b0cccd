"""docs/metrics.md documents every metric name splitserve/metrics.py defines, and no other."""

import re
from pathlib import Path

import splitserve.metrics as m


def test_every_metric_is_documented():
    defined = {v for k, v in vars(m).items() if k.isupper() and isinstance(v, str)
               and v.startswith("splitserve_")}
    doc = (Path(__file__).parent.parent / "docs" / "metrics.md").read_text()
    documented = set(re.findall(r"^\| `(splitserve_\w+)` \|", doc, re.MULTILINE))
    assert len(defined) >= 25
    assert documented == defined
