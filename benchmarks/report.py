"""Where benchmark figures go: one JSON file per script under benchmarks/results/."""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def write_result(out: str | Path, result: dict) -> Path:
    """Write `result` as JSON to `out` (folders made) and say where."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return out
