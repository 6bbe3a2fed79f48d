"""The SASS instructions where a kernel's warps stall most, from an ncu report (its source page as CSV).

Why: ncu's section summaries say which stall reason dominates (e.g. long scoreboard) but not which load or
barrier causes it; the per-instruction stall samples do. Run on the GPU machine after
`ncu -o REPORT --section SourceCounters --section WarpStateStats ...`:

    python3 scripts/ncu_hotspots.py REPORT.ncu-rep [TOP]
"""
from __future__ import annotations

import csv
import io
import subprocess
import sys


def source_rows(report: str) -> list[dict[str, str]]:
    out = subprocess.run(["ncu", "--import", report, "--page", "source", "--csv", "--print-source", "sass"],
                         check=True, capture_output=True, text=True).stdout
    start = out.find('"Address"') if '"Address"' in out else out.find('"#"')
    return list(csv.DictReader(io.StringIO(out[max(start, 0):])))


def number(text: str) -> float:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return 0.0


def main(report: str, top: int = 40) -> None:
    rows = source_rows(report)
    if not rows:
        raise SystemExit(f"{report}: no source rows (was the SourceCounters section collected?)")
    cols = list(rows[0])
    total_col = next(c for c in cols if c.startswith("Warp Stall Sampling (All"))
    reason_cols = [c for c in cols if "stall" in c.lower() and c != total_col and "Not-issued" not in c]
    total = sum(number(r[total_col]) for r in rows) or 1.0
    print(f"{len(rows)} SASS lines, {total:.0f} stall samples; columns: {cols}")
    for r in sorted(rows, key=lambda r: -number(r[total_col]))[:top]:
        reasons = sorted(((number(r[c]), c) for c in reason_cols if number(r[c]) > 0), reverse=True)[:3]
        addr = r.get("Address", r.get("#", ""))
        print(f"{100 * number(r[total_col]) / total:5.1f}%  {addr:>8}  {r.get('Source', '')[:70]:70s}  "
              + ", ".join(f"{c}={v:.0f}" for v, c in reasons))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40)
