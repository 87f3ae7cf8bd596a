"""The sd15 preset has Stable Diffusion 1.5's real dimensions; smaller presets keep its structure."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from networks.refadgen import GenerationUNet, ReferenceUNet
from networks.sd import text_config, vae_from_preset
from runtime.presets import PRESETS, get_preset  # noqa: E402


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_sd15_sizes_equal_stable_diffusion_15():
    from transformers import CLIPTextModel

    preset = get_preset("sd15")
    with torch.device("meta"):  # shapes only: no 3.4 GB allocations
        reference = ReferenceUNet(preset)
        generation = GenerationUNet(preset)
        text = CLIPTextModel(text_config(preset))
        vae = vae_from_preset(preset)
    assert _params(reference) == 859_520_964  # SD 1.5 U-Net
    assert _params(vae) == 83_653_863  # SD 1.5 VAE
    assert _params(text) == 123_060_480  # CLIP ViT-L/14 text encoder
    afm = sum(p.numel() for n, p in generation.named_parameters() if "_ref." in n)
    conv_in_extra = 320 * 1 * 3 * 3  # the mask channel
    assert _params(generation) == 859_520_964 + afm + conv_in_extra


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_has_sixteen_self_attention_layers_at_the_spec_widths(name):
    preset = get_preset(name)
    with torch.device("meta"):
        unet = GenerationUNet(preset)
    modules = dict(unet.unet.named_modules())
    widths = tuple(modules[n].to_q.in_features for n in unet.layer_names)
    assert len(unet.layer_names) == 16
    assert widths == preset.ref_layer_channels
