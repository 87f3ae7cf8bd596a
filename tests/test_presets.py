"""The sd15 preset has Stable Diffusion 1.5's real dimensions; smaller presets keep its structure.
Parameter counts build the networks on torch's meta device; the rest needs no torch."""

from __future__ import annotations

import pytest

from runtime.errors import InputError
from runtime.presets import PRESETS, get_preset


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_sd15_sizes_equal_stable_diffusion_15(torch):
    from transformers import CLIPTextModel

    from networks.refadgen import GenerationUNet, ReferenceUNet
    from networks.sd import text_config, unet_config, vae_config, vae_from_config

    preset = get_preset("sd15")
    with torch.device("meta"):  # shapes only: no 3.4 GB allocations
        reference = ReferenceUNet(unet_config(preset, 4))
        generation = GenerationUNet(unet_config(preset, 5))
        text = CLIPTextModel(text_config(preset))
        vae = vae_from_config(vae_config(preset))
    assert _params(reference) == 859_520_964  # SD 1.5 U-Net
    assert _params(vae) == 83_653_863  # SD 1.5 VAE
    assert _params(text) == 123_060_480  # CLIP ViT-L/14 text encoder
    afm = sum(p.numel() for n, p in generation.named_parameters() if "_ref." in n)
    conv_in_extra = 320 * 1 * 3 * 3  # the mask channel
    assert _params(generation) == 859_520_964 + afm + conv_in_extra


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_has_sixteen_self_attention_layers_at_the_spec_widths(name, torch):
    from networks.refadgen import GenerationUNet
    from networks.sd import unet_config

    preset = get_preset(name)
    with torch.device("meta"):
        unet = GenerationUNet(unet_config(preset, 5))
    modules = dict(unet.unet.named_modules())
    widths = tuple(modules[n].to_q.in_features for n in unet.layer_names)
    assert len(unet.layer_names) == 16
    assert widths == preset.ref_layer_channels


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_default_canvas_lies_in_its_bounds_on_the_vae_grid(name):
    preset = get_preset(name)
    assert preset.vae_scale == 8
    for side in (preset.default_width, preset.default_height, preset.min_side, preset.max_side):
        assert side % preset.vae_scale == 0, side
    assert preset.min_side <= min(preset.default_width, preset.default_height)
    assert max(preset.default_width, preset.default_height) <= preset.max_side


def test_unknown_preset_is_an_input_error_naming_the_presets():
    with pytest.raises(InputError) as err:
        get_preset("huge")
    assert err.value.field == "preset"
    assert str(err.value) == "preset: expected one of tiny, small, sd15 (got 'huge')"
