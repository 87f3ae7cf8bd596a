"""RADM: relation-aware diffusion model for poster layout (Li et al., CIKM 2023).

Built from the paper and the public reference code (GitHub liuan0803/RADM, on DiffusionDet and
detectron2); no code is copied. Two networks plus the shared CLIP text encoder:

- `LayoutBackbone` (spec `layout_backbone`, once per request): detectron2's ResNet-50 (stride in
  the 3x3 convolution, as torchvision v1.5 and RADM's `STRIDE_IN_1X1: False`) + FPN (1x1 lateral,
  nearest top-down upsampling to the lateral's size, 3x3 output convolutions) -> p2..p5. Plain
  `FrozenBatchNorm2d` is detectron2's (four buffers, no `num_batches_tracked`; the ONNX exporter
  folds it into the convolutions). Parameter names follow detectron2 (`bottom_up.stem.conv1.norm.
  weight`, `bottom_up.res2.0.shortcut`, `fpn_lateral2`), less the `backbone.` prefix.
- `LayoutHead` (spec `layout_head`, every step): six cascaded DiffusionDet heads. Each pools 7x7
  RoI features (multi-level RoIAlign, `roi_align_levels`), then
  self-attention over the boxes -> dynamic convolution with the RoI features -> FFN, scaled and
  shifted by the timestep embedding; next to it VTRAM (RoI tokens attend to the selling points)
  and GRAM (geometric relations between the boxes weight an average of RoI features). The fused
  [GRAM | box | VTRAM] feature gives class logits and box deltas; the next head starts from the
  detached refined boxes and this head's box features.

Batch correctness: every operation acts within one sample. The reference repeats the text
features with `repeat` where `repeat_interleave` was meant (box k of sample b reads the texts of
sample k mod B) and its sampler reads sample 0's scores; here text features reach only their own
sample's queries (VTRAM attends from all of a sample's RoI tokens at once), and RoIAlign, GRAM and
self-attention are all per sample.

Assumptions and departures from the reference code:
1. Text features are (texts, D) per sample and the attention runs over texts. The reference
   `view`s its (20, 768) per-sample features as (768, 20), scrambling texts and channels (the
   network was trained on that arrangement); real RADM weights therefore need features
   arranged the same way to reproduce the paper's numbers. The pooled VTRAM feature is the mean
   over the 49 tokens; the reference's raw `reshape` mixes tokens and channels there too.
2. Padded texts: keys and values are multiplied by the mask and scores get (mask - 1) * 1e4, as
   in the reference; never -inf, so a sample without texts yields zeros, not NaN, and padded
   features never reach the output.
   A consequence kept from the reference: VTRAM's output projection instance-normalises over
   the 49 RoI tokens, so a lone real text (every token then attends to it alone) or a shift
   shared by all texts leaves the output unchanged; texts steer the layout from two on.
3. VTRAM's box token is Linear(4 -> hidden) of the INITIAL noisy box (normalised x0, y0, x1, y1)
   in every head, as in the reference (`norm_bboxes` is not refined along the cascade).
4. GRAM works on pixel boxes (x, y centres, widths, heights) with the reference's clamps: widths
   at least 1e-3 px, every ratio at least 1e-3 before the log; embedding 100 * log(ratio) over
   wavelength 1000 (Relation Networks), ordered (feature, frequency, sin/cos). Its projection
   reads the RoI features flattened channel-major, (C, 7, 7), as the reference does.
5. RoIAlign is detectron2's ROIAlignV2 (aligned, sampling ratio 2): samples outside [-1, size]
   give 0, those within clamp to the border. Level = clamp(floor(4 + log2(sqrt(area) / 224 +
   1e-8)), 2, 5) with the area in input-image pixels (image = 4 x p2).
6. Random initialisation (no trained weights are reachable): xavier-uniform for matrices as the
   reference, focal-loss prior on the class bias only (the reference's shape test also hits the
   box token's weight and the delta bias), small box-delta weights so a random cascade keeps
   boxes of sensible size, and GRAM's own N(0, 0.01) init (which the reference defines and then
   overwrites with xavier).
7. Numerics: GRAM multiplies log-ratios by 100 before sin/cos, so one float32 ulp of `log` (which
   differs between torch and ONNX Runtime) becomes ~1e-4 in the embedding, and the cascade
   carries it on. With xavier-initialised GRAM weights the six-head tiny graph misses the fp32
   parity bound (4e-3 on logits of magnitude 7); with GRAM's own init it passes. Trained
   weights may need their parity judged on the sampled layout rather than raw logits.
"""

from __future__ import annotations

import numpy as np
import torch

from networks.layout.backbone import LayoutBackbone
from runtime.specs.layout import FPN_LEVELS


def backbone_parity_feed(backbone: LayoutBackbone):
    """Parity inputs for the head whose p2..p5 are the backbone's features of a random image.

    Six cascaded heads amplify differences in the boxes they pass on; on uniform noise in place
    of FPN features (features no backbone produces) float32 rounding alone grows past the fp32
    parity bound at the `small` preset, while on real features it stays near 1e-5. Read by
    `export.onnx_export.reference_cases`; a plain function, so no weights are shared or saved."""

    def feed(spec, env, rng: np.random.Generator) -> dict[str, np.ndarray]:
        sample = spec.sample_inputs(rng, env)
        image = rng.uniform(-1, 1, size=(env["B"], 3, 4 * env["feat_h"], 4 * env["feat_w"])).astype(np.float32)
        with torch.inference_mode():
            features = backbone(torch.from_numpy(image))
        sample.update({name: f.numpy() for name, f in zip(FPN_LEVELS, features)})
        return spec.cast_inputs(sample)

    return feed
