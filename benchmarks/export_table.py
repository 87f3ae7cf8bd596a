"""Table of one or more `adgen export` folders: per component, export time, size, external
data, peak memory so far, and parity (worst output: max abs, max rel, lowest cosine).

    python -m benchmarks.export_table build/sd15-fp32 build/sd15-fp16
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def rows(folder: Path) -> list[dict]:
    manifest = json.loads((folder / "manifest.json").read_text())
    parity = json.loads((folder / "parity.json").read_text())
    out = []
    for name, entry in manifest["components"].items():
        outputs = parity[name]["outputs"]
        worst = max(outputs, key=lambda o: o["max_abs"] / o["bound"])
        out.append({
            "component": name, "precision": manifest["key"]["precision"], "export_s": entry["export_seconds"],
            "parity_s": entry.get("parity_seconds"), "mb": entry["bytes"] / 1e6, "external": entry.get("external_data", False),
            "peak_rss_gb": entry.get("peak_rss_bytes", 0) / 2**30, "max_abs": worst["max_abs"], "max_rel": worst["max_rel"],
            "bound": worst["bound"], "cosine": min(o["cosine"] for o in outputs), "passed": parity[name]["passed"],
        })
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="+", type=Path)
    args = parser.parse_args(argv)
    print("| component | precision | export s | parity s | MB | external data | peak RSS GB | max abs | max rel | bound | min cosine | pass |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for folder in args.folders:
        for r in rows(folder):
            print(f"| {r['component']} | {r['precision']} | {r['export_s']:.1f} | {r['parity_s'] or 0:.1f} | {r['mb']:.1f} | "
                  f"{'yes' if r['external'] else 'no'} | {r['peak_rss_gb']:.1f} | {r['max_abs']:.2e} | {r['max_rel']:.2e} | "
                  f"{r['bound']:.2e} | {r['cosine']:.6f} | {'yes' if r['passed'] else 'NO'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
