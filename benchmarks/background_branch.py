"""What the personalized style branch costs per step, and what hoisting it out of the loop saves.

    python -m benchmarks.background_branch --preset small --iterations 20 --out results.jsonl

One guided request (U-Net batch 2, branch batch 1) at the preset's default canvas. Each
iteration times, in alternating order so machine noise hits all alike:
  no_reference     one `background_unet` call with zero residuals and style scale 0;
  branch_hoisted   one `background_unet` call with the branch's residuals as invariant inputs
                   (what the pipeline does: the branch ran once per request, before the loop);
  branch_per_step  one `style_branch` call then one `background_unet` call (what a loop that
                   recomputes the branch every step, as a ControlNet loop does, would pay);
  branch_alone     one `style_branch` call (its one-off cost per request).
Then, with --requests-steps N, whole requests through the pipeline with and without a
reference (denoise p50 and total from the pipeline's own report). Prints medians side by side
and appends JSON lines (machine, versions, git commit, spec hashes, raw samples) to --out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.measure import append_jsonl, interleaved, provenance
from runtime.artifacts.weights import WeightsSource
from runtime.backends import load_components
from runtime.backends.base import ModelSource
from runtime.inputs.categories import get_category
from runtime.inputs.images import Product, resize_mask_nearest
from runtime.pipelines import get_pipeline
from runtime.pipelines.background import BackgroundRequest, load_reference
from runtime.presets import PRESETS, get_preset
from runtime.specs.background import style_residual_names

MODES = ("no_reference", "branch_hoisted", "branch_per_step", "branch_alone")


def _product(width: int, height: int) -> Product:
    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    mask = np.zeros((height, width), dtype=bool)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = True
    return Product(rgb=rgb, mask=mask)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small", choices=tuple(PRESETS))
    parser.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "torch"))
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30, help="steps per request, for the per-request totals")
    parser.add_argument("--requests-steps", type=int, default=0, help="also run whole requests of this many steps")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--cache-dir", type=Path)
    parser.add_argument("--out", type=Path, help="append JSON lines here")
    args = parser.parse_args(argv)
    if args.threads and args.backend == "torch":
        import torch  # noqa: PLC0415 - only for the torch backend

        torch.set_num_threads(args.threads)

    say = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731
    preset = get_preset(args.preset)
    definition = get_pipeline("background")
    specs = definition.specs(preset)
    source = ModelSource("background", preset, WeightsSource(), cache_root=args.cache_dir, threads=args.threads, spin=False)
    components = load_components(args.backend, specs, source, say)
    unet, branch = components["background_unet"], components["style_branch"]

    rng = np.random.default_rng(0)
    width, height = preset.default_width, preset.default_height
    h, w = height // preset.vae_scale, width // preset.vae_scale
    env = specs["background_unet"].env_at("opt", B=2, latent_h=h, latent_w=w)
    step_feed = specs["background_unet"].sample_inputs(rng, env)
    product = _product(width, height)
    step_feed["product_mask"] = np.stack([resize_mask_nearest(product.mask, h, w)[None]] * 2)
    branch_feed = specs["style_branch"].sample_inputs(rng, specs["style_branch"].env_at("opt", B=1, latent_h=h, latent_w=w))
    branch_feed["product_mask"] = step_feed["product_mask"][:1]
    branch_feed["reference_mask"] = np.zeros_like(branch_feed["reference_mask"])
    names = style_residual_names(preset)
    residuals = branch.run(branch_feed)
    hoisted = {**step_feed, **{n: np.concatenate([residuals[n]] * 2) for n in names}, "style_scale": np.ones(2, np.float32)}
    plain = {**step_feed, **{n: np.zeros_like(hoisted[n]) for n in names}, "style_scale": np.zeros(2, np.float32)}

    def per_step() -> None:
        out = branch.run(branch_feed)
        unet.run({**hoisted, **{n: np.concatenate([out[n]] * 2) for n in names}})

    runs = {
        "no_reference": lambda: unet.run(plain),
        "branch_hoisted": lambda: unet.run(hoisted),
        "branch_per_step": per_step,
        "branch_alone": lambda: branch.run(branch_feed),
    }
    samples = interleaved(runs, args.warmup, args.iterations)

    p50 = {m: float(np.median(samples[m])) for m in MODES}
    print(f"background pipeline, preset {preset.name}, backend {args.backend}, latent {h}x{w}, U-Net batch 2, branch batch 1, "
          f"{args.iterations} iterations after {args.warmup} warm-up")
    print(f"{'per step':<18} {'p50 ms':>9} {'p90 ms':>9} {'min ms':>9} {'vs no_reference':>16}")
    for m in MODES:
        s = np.array(samples[m])
        print(f"{m:<18} {1000 * p50[m]:9.2f} {1000 * np.percentile(s, 90):9.2f} {1000 * s.min():9.2f} "
              f"{p50[m] / p50['no_reference']:15.3f}x")
    n = args.steps
    once = p50["branch_alone"] + n * p50["branch_hoisted"]
    every = n * p50["branch_per_step"]
    print(f"per request of {n} steps: branch once {1000 * once:.0f} ms, branch every step {1000 * every:.0f} ms, "
          f"saving {1000 * (every - once):.0f} ms ({1 - once / every:.1%}); per step the branch costs "
          f"{1000 * (p50['branch_per_step'] - p50['branch_hoisted']):.1f} ms when recomputed")

    records = [{
        "benchmark": "background_branch", "preset": preset.name, "backend": args.backend, "mode": m,
        "latent": [h, w], "unet_batch": 2, "branch_batch": 1, "threads": args.threads,
        "p50_s": p50[m], "samples_s": samples[m],
        "spec_hash": {k: specs[k].spec_hash() for k in ("background_unet", "style_branch")},
        **provenance(),
    } for m in MODES]

    if args.requests_steps:
        records += _requests(definition, components, preset, product, args, say)
    append_jsonl(args.out, records)
    return 0


def _requests(definition, components, preset, product, args, say) -> list[dict]:
    """Whole requests through the pipeline, with and without a reference, alternating."""
    import tempfile

    steps = args.requests_steps

    runner = definition.create(components, preset, WeightsSource())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "reference.png"
        Image.fromarray(np.random.default_rng(1).integers(0, 256, (preset.default_height, preset.default_width, 3), dtype=np.uint8)).save(path)
        reference = load_reference(path, preset.default_width, preset.default_height)
    category = get_category("sneakers")
    requests = {"without_reference": BackgroundRequest(product, category), "with_reference": BackgroundRequest(product, category, reference)}
    reports: dict[str, list[dict]] = {k: [] for k in requests}
    rounds = max(2, args.iterations // 4)
    say(f"{rounds} rounds of whole {steps}-step requests")
    for i in range(rounds + 1):
        for key in requests if i % 2 == 0 else list(requests)[::-1]:
            timings = runner([requests[key]], steps=steps).timings
            if i:  # the first round warms up
                reports[key].append(timings)
    print(f"whole requests, {steps} steps, {rounds} each: {'':<4} {'denoise p50 ms':>15} {'style_branch ms':>16} {'total ms':>10}")
    records = []
    for key, runs in reports.items():
        step = float(np.median([r["denoise_step"]["p50"] for r in runs]))
        branch = float(np.median([r.get("style_branch", 0.0) for r in runs]))
        total = float(np.median([r["total"] for r in runs]))
        print(f"{key:<36} {1000 * step:15.2f} {1000 * branch:16.2f} {1000 * total:10.1f}")
        records.append({"benchmark": "background_branch", "mode": f"request_{key}", "preset": preset.name, "steps": steps,
                        "backend": args.backend,
                        "denoise_step_p50_s": step, "style_branch_s": branch, "total_s": total, "timings": runs,
                        **provenance()})
    return records


if __name__ == "__main__":
    sys.exit(main())
