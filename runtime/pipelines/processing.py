"""Processing profiles: what happens to a request around the networks, named, so that a trained
model gets what its authors' code gave it (`reference`) or what adgen does (`adgen`, the default
for random-init presets). A weights folder from `adgen import` names the profile its weights were
trained with; `--processing` overrides it.

RefAdGen, reference (yunsoft2019/RefAdgen, `experiments/predict*.py`, `utils/gen_pipe.py`):
- the product photo's background is filled WHITE (adgen: neutral grey);
- the canvas is the preset's default (512 x 640 at sd15) whatever the photo's shape, and the
  photo is stretched onto it: first resized so its short side is the canvas's short side and its
  long side at most the canvas's long side, sides floored to a multiple (64 at sd15), then to
  the canvas (bilinear); the result is resized back to the photo's size (bicubic) before the
  product's own pixels are pasted back (adgen's final step either way);
- the CLIP input is that resized photo, short side resized to the encoder's size (bicubic) and
  centre-cropped (transformers' CLIPImageProcessor; adgen pads to a square);
- the product mask goes to latent size straight from the photo, torch's nearest rule;
- the product latent is SAMPLED from the VAE posterior with noise from the request's seed
  (adgen: the posterior mode);
- ", best quality, high quality" is appended to the prompt, and the negative prompt defaults to
  the reference's.

RADM (layout), reference (liuan0803/RADM, `RADM/detector.py`, `configs/radm.yaml`):
- box renewal replaces boxes whose best class score is at most CLASS_THRESH = 0.25 (adgen:
  DiffusionDet's 0.5);
- with more than one step, every step's top-k (box, class) candidates are merged before NMS
  (adgen: the last step's);
- a candidate left with no area once clipped to the canvas is dropped after NMS (adgen keeps it
  at the edge, one pixel wide).
- the backbone input is the canvas at short side 800 and long side at most 1333 (at most the
  largest input the preset allows), zero-padded after the normalisation at the bottom and right to a
  multiple of 32; the boxes are relative to the image within the padding (adgen: the canvas
  resized to `image_side` on its long side, a multiple of 32, no padding).
The network quirks its weights learned are not processing but architecture: a head imported from
RADM carries them in its config (`LayoutSize.proposal_frame` "hwhw", `reference_views`).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from runtime.artifacts.weights import WeightsSource
from runtime.errors import InputError
from runtime.inputs.images import GREY

WHITE = 255


class Profile(str, Enum):
    ADGEN = "adgen"
    REFERENCE = "reference"

    @classmethod
    def parse(cls, value: "str | Profile | None") -> "Profile":
        if value is None:
            return cls.ADGEN
        try:
            return cls(value)
        except ValueError:
            raise InputError("processing", f"expected one of {', '.join(p.value for p in cls)}", repr(value)) from None


def with_weights_default(pipeline: str, accepted: tuple[str, ...], weights: WeightsSource, options: dict) -> dict:
    """`options` with `processing` from the weights folder's manifest when the request names none
    (a request's own `processing` wins). Pipelines without the option are left as they are."""
    if "processing" not in accepted or options.get("processing") is not None:
        return options
    default = weights.processing(pipeline)
    return options if default is None else {**options, "processing": default}


@dataclass(frozen=True)
class RefAdGenProcessing:
    profile: Profile
    fill: int  # colour around the product in what the encoders see
    stretch: bool  # the photo stretched onto the preset's canvas and the result resized back (else fitted)
    clip_crop: bool  # CLIP input: short side resized and centre-cropped (else padded to a square)
    sample_latent: bool  # the product latent sampled from the posterior (else its mode)
    prompt_suffix: str
    default_negative_prompt: str

    def prompt(self, prompt: str) -> str:
        return prompt + self.prompt_suffix

    def negative_prompt(self, negative_prompt: str | None) -> str:
        return self.default_negative_prompt if negative_prompt is None else negative_prompt


@dataclass(frozen=True)
class LayoutProcessing:
    profile: Profile
    renewal_threshold: float  # box renewal: a box whose best class score is at most this is renewed
    merge_steps: bool  # every step's candidates merged before NMS (else the last step's)
    drop_empty: bool  # a candidate with no area once clipped is dropped (else kept at the edge)
    reference_input: bool  # backbone input: short side 800, long <= 1333, padded to 32 (else long side image_side)


LAYOUT = {
    Profile.ADGEN: LayoutProcessing(Profile.ADGEN, renewal_threshold=0.5, merge_steps=False, drop_empty=False,
                                    reference_input=False),
    Profile.REFERENCE: LayoutProcessing(Profile.REFERENCE, renewal_threshold=0.25, merge_steps=True, drop_empty=True,
                                        reference_input=True),
}

REFADGEN = {
    Profile.ADGEN: RefAdGenProcessing(Profile.ADGEN, GREY, stretch=False, clip_crop=False, sample_latent=False,
                                      prompt_suffix="", default_negative_prompt=""),
    Profile.REFERENCE: RefAdGenProcessing(
        Profile.REFERENCE, WHITE, stretch=True, clip_crop=True, sample_latent=True,
        prompt_suffix=", best quality, high quality",
        default_negative_prompt="bare, naked, nude, undressed, monochrome, bad anatomy, worst quality, low quality",
    ),
}
