"""Tables and plots from harness results.

    python -m benchmarks.report results.jsonl --out report/

Writes report.md (one row per scenario: latency p50/p90/p99, mean, std, per-step p50,
images/s, cold time, peak memory, MFU, speed-up over the torch-eager baseline measured in the
same run) and PNG plots: stages.png (p50 time per stage), concurrency.png (latency and
throughput against concurrency), backends.png (end-to-end p50 per backend).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from benchmarks.harness import BASELINE_BACKEND, SCHEMA_VERSION, speedups

REQUIRED = ("schema", "label", "scenario", "latency_s", "stages_s", "images_per_s", "cold_s", "peak_host_rss_mb",
            "spec_hash", "samples", "machine", "git_commit")
STAGE_ORDER = ("load_inputs", "text_encode", "image_encode", "vae_encode", "reference_unet", "style_branch",
               "layout_backbone", "layout_step", "postprocess", "render_cond", "denoise_step", "vae_decode", "compose",
               "typeset")


def stages_of(records: list[dict[str, Any]]) -> list[str]:
    """Stages present in the records, pipeline order first, unknown ones after."""
    present = {stage for r in records for stage in r["stages_s"] if stage != "total"}
    return [s for s in STAGE_ORDER if s in present] + sorted(present - set(STAGE_ORDER))


class ReportError(ValueError):
    pass


def load_records(path: Path) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}:{number}: not JSON ({e})") from e
        if record.get("benchmark") != "harness":
            continue  # other benchmarks share results files
        missing = [k for k in REQUIRED if k not in record]
        if missing:
            raise ReportError(f"{path}:{number}: missing fields {missing}")
        if record["schema"] != SCHEMA_VERSION:
            raise ReportError(f"{path}:{number}: schema {record['schema']}, this report reads {SCHEMA_VERSION}")
        records.append(record)
    if not records:
        raise ReportError(f"{path}: no harness records")
    return records


def markdown(records: list[dict[str, Any]]) -> str:
    ratio = speedups(records)
    m = records[0]["machine"]
    lines = [
        "# Benchmark report",
        "",
        f"Machine: {m['device']}, {m['platform']}, Python {m['python']}; "
        + ", ".join(f"{k} {v}" for k, v in sorted(m["versions"].items())),
        f"Commit {records[0]['git_commit']}. Latencies are per request (a batch of `batch` ads), warm-up excluded; "
        f"speed-up is the `{BASELINE_BACKEND}` (eager, no export) p50 over the scenario's p50, same run.",
        "",
        "| scenario | p50 s | p90 s | p99 s | mean s | std s | step p50 ms | images/s | cold s | peak RSS MB "
        "| MFU e2e | speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lat = r["latency_s"]
        step = r["stages_s"].get("denoise_step", {}).get("p50")
        mfu = r.get("mfu", {}).get("end_to_end")
        step_cell = f"{1000 * step:.1f}" if step else "-"
        mfu_cell = f"{100 * mfu:.1f}%" if mfu is not None else "-"
        ratio_cell = f"{ratio[r['label']]:.2f}x" if r["label"] in ratio else "-"
        rss_cell = f"{r['peak_host_rss_mb']:.0f}"
        if r.get("peak_server_rss_mb"):
            rss_cell += f" + server {r['peak_server_rss_mb']:.0f}"
        lines.append(
            f"| {r['label']} | {lat['p50']:.3f} | {lat['p90']:.3f} | {lat['p99']:.3f} | {lat['mean']:.3f} "
            f"| {lat['std']:.3f} | {step_cell} | {r['images_per_s']:.2f} | {r['cold_s']:.1f} "
            f"| {rss_cell} | {mfu_cell} | {ratio_cell} |"
        )
    stages = stages_of(records)
    lines += ["", "Per-stage p50 (s) and MFU:", "", "| scenario | " + " | ".join(stages) + " |",
              "|---|" + "---|" * len(stages)]
    for r in records:
        cells = []
        for stage in stages:
            p50 = r["stages_s"].get(stage, {}).get("p50")
            mfu = r.get("mfu", {}).get(stage)
            cell = "-" if p50 is None else f"{p50:.4f}"
            if mfu is not None:
                cell += f" ({100 * mfu:.1f}%)"
            cells.append(cell)
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    if any("flops" in r for r in records):
        peak = records[0].get("device_peak_flops")
        lines += ["", f"MFU is achieved FLOP/s over {peak / 1e9:.0f} GFLOP/s ({records[0].get('device_peak_source')}); "
                  "FLOPs from torch's FLOP counter on the same networks."]
    return "\n".join(lines) + "\n"


def plots(records: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(11, 1.0 + 0.45 * len(records)))
    left = [0.0] * len(records)
    for stage in stages_of(records):
        values = []
        for r in records:
            s = r["stages_s"].get(stage, {})
            per_request = s.get("p50", 0.0) * (r["scenario"]["steps"] if stage == "denoise_step" else 1)
            values.append(per_request)
        if any(values):
            ax.barh([r["label"] for r in records], values, left=left, label=stage)
            left = [a + b for a, b in zip(left, values)]
    ax.set_xlabel("seconds per request (stage p50; denoise = step p50 x steps)")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.invert_yaxis()
    fig.tight_layout()
    written.append(_save(fig, out / "stages.png"))

    fig, (lat_ax, thr_ax) = plt.subplots(1, 2, figsize=(10, 4))
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        s = r["scenario"]
        groups.setdefault(f"{s['backend']}/{s['placement']}/b{s['batch']}", []).append(r)
    for name, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["scenario"]["concurrency"])
        xs = [r["scenario"]["concurrency"] for r in rs]
        lat_ax.plot(xs, [r["latency_s"]["p50"] for r in rs], marker="o", label=name)
        thr_ax.plot(xs, [r["images_per_s"] for r in rs], marker="o", label=name)
    lat_ax.set(xlabel="concurrent callers", ylabel="p50 latency (s)", title="latency vs concurrency")
    thr_ax.set(xlabel="concurrent callers", ylabel="images/s", title="throughput vs concurrency")
    lat_ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(_save(fig, out / "concurrency.png"))

    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.45 * len(records)))
    ax.barh([r["label"] for r in records], [r["latency_s"]["p50"] for r in records],
            xerr=[[r["latency_s"]["p50"] - r["latency_s"]["min"] for r in records],
                  [r["latency_s"]["p90"] - r["latency_s"]["p50"] for r in records]])
    ax.set_xlabel("end-to-end p50 (s); bars from min to p90")
    ax.invert_yaxis()
    fig.tight_layout()
    written.append(_save(fig, out / "backends.png"))
    return written


def _save(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="JSON lines from `adgen bench`")
    parser.add_argument("--out", type=Path, required=True, help="folder for report.md and the PNG plots")
    args = parser.parse_args(argv)
    try:
        records = load_records(args.results)
    except (OSError, ReportError) as e:
        print(f"report: error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.md").write_text(markdown(records))
    written = plots(records, args.out)
    print(f"wrote {args.out / 'report.md'} and {', '.join(p.name for p in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
