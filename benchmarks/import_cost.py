"""Import time and peak memory of `adgen import` at the released sizes, on synthetic files.

    python -m benchmarks.import_cost --family refadgen radm --workdir /tmp/adgen-import \\
        --output-json benchmarks/results/import_cost_cpu.jsonl

Builds each family's sources in --workdir (benchmarks/synthetic_checkpoints.py, SD15 sizes):
RefAdGen's DeepSpeed file in fp16 holding both U-Nets, the resampler and the AFM duplicates, as
the release does (about 3.5 GB), beside an fp16 ViT-H image encoder and an SD 1.5 folder
(tokenizer, text encoder, VAE); RADM's model_final.pth (ResNet-50 + FPN, six heads, fp32) with
an SD 1.5 text encoder. It then runs `adgen import` in a child process and writes one JSON line
per import: wall seconds, peak resident memory (and its anonymous and file-backed parts), bytes
read and written.
The workdir is deleted afterwards unless --keep.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchmarks.measure import append_jsonl, provenance


def build_sources(family: str, workdir: Path) -> list[str]:
    """The family's synthetic sources in `workdir`; returns the import's arguments."""
    import torch

    from benchmarks import synthetic_checkpoints as ck

    marker = workdir / "UNPICKLED"  # the .bin traps beside the safetensors
    if family == "refadgen":
        ck.sd_folder(workdir / "sd", marker, unet_weights=False, sizes=ck.SD15, dtype=torch.float16)
        ck.image_encoder_folder(workdir / "image_encoder", marker, ck.SD15, dtype=torch.float16)
        ck.deepspeed_file(workdir / "mp_rank_00_model_states.pt", ck.refadgen_module(ck.SD15, dtype=torch.float16))
        return ["refadgen", "--checkpoint", str(workdir / "mp_rank_00_model_states.pt"), "--base", str(workdir / "sd"),
                "--vae", str(workdir / "sd" / "vae"), "--image-encoder", str(workdir / "image_encoder")]
    ck.text_encoder_folder(workdir / "text_encoder", marker, ck.SD15)
    from benchmarks.synthetic_vocabulary import write_vocabulary

    write_vocabulary(workdir / "tokenizer")
    ck.radm_file(workdir / "model_final.pth", ck.SD15)
    return ["radm", "--checkpoint", str(workdir / "model_final.pth"), "--text-encoder", str(workdir / "text_encoder")]


def timed_import(arguments: list[str], out: Path) -> dict:
    """`adgen import` in a child process: wall seconds and, sampled from its /proc status every
    50 ms, its peak resident memory (VmHWM, the kernel's high-water mark of this program, not of
    the process it was forked from) and the peaks of its anonymous part and of its file-backed
    part (memory-mapped checkpoints, which the kernel can reclaim)."""
    command = [sys.executable, "-m", "runtime.cli", "import", *arguments, "--out", str(out), "--quiet"]
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peaks = _Peaks(child.pid)
    summary, failure = child.communicate()
    peaks.stop()
    seconds = time.perf_counter() - started
    if child.returncode != 0:
        raise SystemExit(f"import failed ({child.returncode}):\n{failure[-3000:]}")
    return {"wall_s": round(seconds, 2), "peak_rss_mb": round(peaks["VmHWM"] / 1024, 1),
            "peak_rss_anon_mb": round(peaks["RssAnon"] / 1024, 1), "peak_rss_file_mb": round(peaks["RssFile"] / 1024, 1),
            "summary": summary}


class _Peaks(dict):
    """The largest VmHWM, RssAnon and RssFile (kB) seen in /proc/<pid>/status, sampled every 50 ms."""

    def __init__(self, pid: int):
        super().__init__(VmHWM=0, RssAnon=0, RssFile=0)
        self._done = threading.Event()
        self._status = Path(f"/proc/{pid}/status")
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.is_set():
            try:
                for line in self._status.read_text().splitlines():
                    key, _, value = line.partition(":")
                    if key in self:
                        self[key] = max(self[key], int(value.split()[0]))
            except (OSError, ValueError):  # the process is gone, or a line was cut
                pass
            self._done.wait(0.05)

    def stop(self) -> None:
        self._done.set()
        self._thread.join()



def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", nargs="+", choices=("refadgen", "radm"), default=["refadgen", "radm"])
    parser.add_argument("--workdir", type=Path, required=True, help="where the synthetic sources go (several GB)")
    parser.add_argument("--output-json", type=Path, default=None, help="append one JSON line per import")
    parser.add_argument("--keep", action="store_true", help="keep the sources and the imported folders")
    args = parser.parse_args(argv)
    records = []
    for family in args.family:
        workdir = args.workdir / family
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        try:
            started = time.perf_counter()
            arguments = build_sources(family, workdir / "sources")
            built = time.perf_counter() - started
            result = timed_import(arguments, workdir / "imported")
            record = {
                "benchmark": "import_cost", "family": family, "sizes": "SD15", **provenance(),
                "sources_bytes": folder_bytes(workdir / "sources"), "imported_bytes": folder_bytes(workdir / "imported"),
                "build_sources_s": round(built, 1),
                **{k: result[k] for k in ("wall_s", "peak_rss_mb", "peak_rss_anon_mb", "peak_rss_file_mb")},
            }
            print(f"{family}: import {record['wall_s']:.1f} s, peak RSS {record['peak_rss_mb']:.0f} MB (anonymous "
                  f"{record['peak_rss_anon_mb']:.0f}, file-backed {record['peak_rss_file_mb']:.0f}), sources "
                  f"{record['sources_bytes'] / 2**30:.2f} GiB -> {record['imported_bytes'] / 2**30:.2f} GiB", flush=True)
            print(result["summary"], flush=True)
            records.append(record)
        finally:
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
    append_jsonl(args.output_json, records)
    return 0


if __name__ == "__main__":
    sys.exit(main())
