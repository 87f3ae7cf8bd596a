"""`adgen`: generate ads and export graphs from the command line.

    adgen generate --pipeline refadgen --product shoe.png --prompt "a sneaker on a wooden table" --out ad.png
    adgen export --pipeline refadgen --preset tiny --out build/

Errors a user can cause print one line naming the field and the rule, and exit non-zero.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from .errors import AdgenError
from .presets import PRESETS

BACKEND_CHOICES = ("onnxruntime", "torch")


class TerminalProgress:
    """Progress on stderr: one updating line on a terminal, plain lines otherwise."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.tty = sys.stderr.isatty()

    def message(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)

    def step(self, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.tty:
            end = "\n" if done == total else ""
            print(f"\rdenoising {done}/{total}", end=end, file=sys.stderr, flush=True)
        elif done == total:
            print(f"denoised {total} steps", file=sys.stderr, flush=True)


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", default="refadgen", choices=("refadgen",), help="which pipeline (default refadgen)")
    parser.add_argument("--preset", default="tiny", choices=tuple(PRESETS), help="network sizes (default tiny)")
    parser.add_argument("--weights", type=Path, help="local weights folder (safetensors); default: random init")
    parser.add_argument("--init-seed", type=int, default=0, help="seed of the random initialisation (no --weights)")
    parser.add_argument("--cache-dir", type=Path, help="exported-graph cache (default $ADGEN_CACHE or ~/.cache/adgen)")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adgen", description="Ad-image diffusion runtime")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="make an ad image from a product photo")
    _model_arguments(gen)
    gen.add_argument("--product", type=Path, required=True, help="RGBA product image (alpha = mask), or RGB with --mask")
    gen.add_argument("--mask", type=Path, help="product mask (white = product) for an RGB product image")
    gen.add_argument("--prompt", required=True, help="what the background should show")
    gen.add_argument("--negative-prompt", default="", help="what it should not show")
    gen.add_argument("--out", type=Path, required=True, help="output PNG; the report goes beside it as .json")
    gen.add_argument("--width", type=int, help="canvas width, multiple of 8 (default: the product's, else the preset's)")
    gen.add_argument("--height", type=int, help="canvas height, multiple of 8")
    gen.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    gen.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale (default 7.5)")
    gen.add_argument("--afm-scale", type=float, default=1.0, help="weight of the reference attention (default 1.0)")
    gen.add_argument("--seed", type=int, default=0, help="noise seed; same seed, same image")
    gen.add_argument("--scheduler", default="ddim", choices=("ddim", "dpm++"))
    gen.add_argument("--backend", default="onnxruntime", choices=BACKEND_CHOICES)
    gen.add_argument("--graphs", type=Path, help="use this folder from `adgen export` instead of the cache")
    gen.add_argument("--threads", type=int, help="intra-op threads (default: the backend's)")

    exp = sub.add_parser("export", help="export a pipeline's components to ONNX with a parity report")
    _model_arguments(exp)
    exp.add_argument("--out", type=Path, required=True, help="new folder for the graphs, parity.json and manifest.json")
    exp.add_argument("--precision", default="fp32", choices=("fp32",))
    exp.add_argument(
        "--attention", default="ort", choices=("ort", "onnx"),
        help="ort: fused com.microsoft.MultiHeadAttention (ONNX Runtime); onnx: portable MatMul/Softmax (TensorRT, others)",
    )
    return parser


def _generate(args: argparse.Namespace, progress: TerminalProgress) -> int:
    from .api import load_pipeline, prepare, run, save_result

    prepared = prepare(
        args.preset, product=args.product, prompt=args.prompt, mask=args.mask, negative_prompt=args.negative_prompt,
        width=args.width, height=args.height, steps=args.steps, guidance=args.guidance, afm_scale=args.afm_scale,
        seed=args.seed, scheduler=args.scheduler,
    )
    loaded = load_pipeline(
        pipeline=args.pipeline, preset=args.preset, backend=args.backend, weights=args.weights,
        init_seed=args.init_seed, cache_dir=args.cache_dir, graphs_dir=args.graphs, threads=args.threads,
        progress=progress.message,
    )
    result = run(loaded, prepared, on_step=progress.step)
    image_path, report_path = save_result(result, args.out)
    timings = result.report["timings_s"]
    progress.message(
        f"wrote {image_path} and {report_path}: {timings['total']:.2f} s total, "
        f"{1000 * timings['denoise_step']['p50']:.1f} ms per step (p50)"
    )
    return 0


def _export(args: argparse.Namespace, progress: TerminalProgress) -> int:
    try:
        from export.onnx_export import export_pipeline
        from networks.build import build_modules
    except ImportError as e:
        raise AdgenError(f"export needs torch ({e.name} missing): pip install 'adgen[export]'") from e
    from .artifacts import GraphKey
    from .components import pipeline_specs
    from .presets import get_preset
    from .specs import AttentionKernel, Precision
    from .weights import WeightsSource

    preset = get_preset(args.preset)
    precision = Precision(args.precision)
    weights = WeightsSource(seed=args.init_seed, path=args.weights)
    specs = pipeline_specs(args.pipeline, preset, precision)
    key = GraphKey.of(
        args.pipeline, preset.name, precision, specs, weights.fingerprint(preset.name), AttentionKernel(args.attention)
    )
    folder = export_pipeline(build_modules(args.pipeline, preset, weights), specs, key, args.out, progress.message)
    progress.message(f"wrote {folder} (parity.json, manifest.json)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    progress = TerminalProgress(quiet=args.quiet)
    try:
        return {"generate": _generate, "export": _export}[args.command](args, progress)
    except AdgenError as e:
        print(f"adgen: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("adgen: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
