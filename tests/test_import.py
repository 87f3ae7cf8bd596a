"""`adgen import`: synthetic checkpoints in the real layouts and containers (benchmarks/synthetic_checkpoints.py)
import, export and generate at a tiny architecture that is not the `tiny` preset's; each part
whose library class exists computes what that class computes when loaded from the same source
files (fp32, bound IMPORT_ATOL); pickles beside safetensors are never read, and a pickle whose
unpickling would run code is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from benchmarks import synthetic_checkpoints as ck  # noqa: E402
from runtime.api import generate, load_pipeline  # noqa: E402
from runtime.artifacts.architecture import resolve_preset  # noqa: E402
from runtime.artifacts.weights import WeightsSource, read_weights_manifest  # noqa: E402
from runtime.cli import main  # noqa: E402
from runtime.errors import WeightsError  # noqa: E402

IMPORT_ATOL = 1e-4  # fp32; adgen's attention kernels and the libraries' differ in summation order only


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Every source file once: an SD folder (also RefAdGen's base and VAE), an image encoder, a
    ControlNet, RefAdGen's DeepSpeed file, RADM's detectron2 file, SD's original single file."""
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("sources")
    marker = root / "UNPICKLED"
    models = ck.sd_folder(root / "sd", marker)
    ck.image_encoder_folder(root / "image_encoder", marker)
    ck.controlnet_folder(root / "controlnet", marker)
    module = ck.refadgen_module()
    ck.deepspeed_file(root / "mp_rank_00_model_states.pt", module)
    radm = ck.radm_file(root / "model_final.pth")
    ck.sd_single_file(root / "v1-5-pruned-emaonly.safetensors", models)
    return SimpleNamespace(root=root, marker=marker, sd=root / "sd", image_encoder=root / "image_encoder",
                           controlnet=root / "controlnet", deepspeed=root / "mp_rank_00_model_states.pt",
                           radm=root / "model_final.pth", single_file=root / "v1-5-pruned-emaonly.safetensors",
                           module=module, radm_model=radm)


def run_import(*argv: str) -> int:
    return main(["import", *argv, "--quiet"])


@pytest.fixture(scope="module")
def refadgen_weights(sources, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imported") / "refadgen"
    s = sources
    assert run_import("refadgen", "--checkpoint", str(s.deepspeed), "--base", str(s.sd), "--vae", str(s.sd / "vae"),
                      "--image-encoder", str(s.image_encoder), "--out", str(out)) == 0
    return out


@pytest.fixture(scope="module")
def poster_weights(sources, tmp_path_factory) -> Path:
    """An SD folder and a ControlNet folder imported into one folder: the poster's trained parts."""
    out = tmp_path_factory.mktemp("imported") / "poster"
    assert run_import("sd", "--checkpoint", str(sources.sd), "--out", str(out)) == 0
    assert run_import("controlnet", "--checkpoint", str(sources.controlnet), "--out", str(out)) == 0
    return out


@pytest.fixture(scope="module")
def radm_weights(sources, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("imported") / "radm"
    assert run_import("radm", "--checkpoint", str(sources.radm), "--text-encoder", str(sources.sd / "text_encoder"),
                      "--out", str(out)) == 0
    return out


def imported(pipeline: str, folder: Path, allow_random: frozenset[str] = frozenset()):
    from networks.registry import build_modules

    weights = WeightsSource(path=folder, allow_random=allow_random)
    return build_modules(pipeline, resolve_preset("tiny", weights), weights)


def close(got, expected, what: str) -> None:
    got, expected = (t.detach().float().numpy() if hasattr(t, "detach") else t for t in (got, expected))
    np.testing.assert_allclose(got, expected, atol=IMPORT_ATOL, rtol=0, err_msg=what)


def test_refadgen_import_writes_parts_manifest_and_processing_profile(sources, refadgen_weights):
    manifest = read_weights_manifest(refadgen_weights)
    assert set(manifest["parts"]) == {"unet", "reference_unet", "image_encoder", "text_encoder", "vae"}
    assert manifest["processing"] == {"refadgen": "reference"}
    recorded = manifest["sources"]["mp_rank_00_model_states.pt"]
    assert recorded["bytes"] == sources.deepspeed.stat().st_size and len(recorded["sha256"]) == 64
    (account,) = manifest["imports"]
    assert any("adapter_modules.* (32 tensors): duplicates" in d for d in account["dropped"])
    assert any("visual_projection" in d for d in account["dropped"])
    assert any("query/key/value/proj_attn" in m for m in account["mapped"])  # the VAE's older names
    assert not sources.marker.exists()  # the .bin beside every .safetensors was never unpickled


def test_refadgen_architecture_comes_from_the_files(refadgen_weights):
    preset = resolve_preset("tiny", WeightsSource(path=refadgen_weights))
    assert preset.name == "tiny" and preset.architecture.startswith("weights ")
    assert (preset.text.hidden_size, preset.text.hidden_act) == (64, "gelu")
    assert (preset.image.hidden_size, preset.image.hidden_act, preset.image.num_tokens) == (48, "gelu", 8)
    assert preset.unet.cross_attention_dim == 64 and preset.vae.block_out_channels == (8, 16, 32, 32)
    from runtime.pipelines import get_pipeline

    specs = get_pipeline("refadgen").specs(preset)
    assert specs["image_encoder"].outputs[0].shape == ("B", 8, 64)
    assert specs["text_encoder"].outputs[0].shape == ("B", 77, 64)


def test_refadgen_parts_equal_the_library_classes_on_the_same_files(sources, refadgen_weights):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPVisionModelWithProjection

    modules = imported("refadgen", refadgen_weights)
    torch.manual_seed(0)
    with torch.inference_mode():
        ids = torch.randint(0, 550, (2, 77))
        text = CLIPTextModel.from_pretrained(sources.sd / "text_encoder").eval()
        close(modules["text_encoder"](ids), text(input_ids=ids).last_hidden_state, "text_encoder")

        pixels = torch.randn(2, 3, 32, 32)
        vision = CLIPVisionModelWithProjection.from_pretrained(sources.image_encoder).eval()
        proj = {k.removeprefix("proj."): v for k, v in sources.module.items() if k.startswith("proj.")}
        carrier = UNet2DConditionModel(**ck.TINY.unet)
        resampler = carrier._convert_ip_adapter_image_proj_to_diffusers(proj, low_cpu_mem_usage=False).eval()
        hidden = vision(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        close(modules["image_encoder"](pixels), resampler(hidden), "image_encoder")

        vae = AutoencoderKL.from_pretrained(sources.sd / "vae").eval()
        latent = torch.randn(1, 4, 8, 8)
        close(modules["vae_decoder"](latent), vae.decode(latent / vae.config.scaling_factor).sample, "vae_decoder")
        image = torch.rand(1, 3, 64, 64) * 2 - 1
        latent, latent_std = modules["vae_encoder"](image)
        posterior = vae.encode(image).latent_dist
        close(latent, posterior.mode() * vae.config.scaling_factor, "vae_encoder")
        close(latent_std, posterior.std * vae.config.scaling_factor, "vae_encoder latent_std")

        context = torch.randn(2, 77, 64)
        reference = UNet2DConditionModel(**ck.TINY.unet).eval()
        reference.load_state_dict({k.removeprefix("ref_unet."): v for k, v in sources.module.items()
                                   if k.startswith("ref_unet.")})
        captured = []
        for name in modules["unet"].layer_names:  # the inputs of the 16 self-attentions, in forward order
            dict(reference.named_modules())[name].register_forward_pre_hook(
                lambda m, args, kwargs: captured.append(kwargs.get("hidden_states", args[0] if args else None)),
                with_kwargs=True)
        product = torch.randn(2, 4, 8, 8)
        reference(product, torch.zeros(2), encoder_hidden_states=context)
        states = modules["reference_unet"](product, context)
        assert len(states) == len(captured) == 16
        for i, (got, expected) in enumerate(zip(states, captured)):
            close(got, expected, f"reference_unet state {i}")

        # AFM's projections are the file's to_k_ref/to_v_ref; at afm_scale 0 the U-Net is the plain one
        kv = modules["afm_kv"](*states)
        first = modules["unet"].layer_names[0]
        close(kv[0], states[0] @ sources.module[f"unet.{first}.processor.to_k_ref.weight"].T, "afm_kv key 0")
        generation = UNet2DConditionModel(**(ck.TINY.unet | {"in_channels": 5})).eval()
        generation.load_state_dict({k.removeprefix("unet."): v for k, v in sources.module.items()
                                    if k.startswith("unet.") and "_ref." not in k})
        sample, t = torch.randn(2, 5, 8, 8), torch.tensor([999.0, 10.0])
        got = modules["unet"](sample, t, context, *kv, torch.zeros(2))
        close(got, generation(sample, t, encoder_hidden_states=context).sample, "unet at afm_scale 0")


def test_refadgen_import_exports_and_generates(refadgen_weights, tmp_path, product_png):
    pipe = load_pipeline("refadgen", preset="tiny", weights=refadgen_weights, cache_dir=tmp_path / "cache")
    result = generate(pipe, product=product_png, prompt="a red sneaker on a wooden table", steps=2)
    assert result.image.shape == (160, 128, 3)
    report = result.report
    assert report["architecture"] == pipe.source.preset.architecture
    assert all(status.startswith("trained (") for status in report["weights_parts"].values()), report["weights_parts"]
    assert report["weights_parts"]["unet"] == "trained (mp_rank_00_model_states.pt (unet.*))"
    assert report["tokenizer"].startswith("CLIP BPE")
    assert report["processing"] == "reference"  # the manifest's profile, as its weights were trained
    explicit = generate(pipe, product=product_png, prompt="a red sneaker", steps=1, processing="adgen")
    assert explicit.report["processing"] == "adgen"  # the request's own choice wins


def test_radm_import_drops_the_diffusion_buffers_and_keeps_names(sources, radm_weights):
    manifest = read_weights_manifest(radm_weights)
    assert set(manifest["parts"]) == {"layout_backbone", "layout_head", "text_encoder"}
    assert manifest["processing"] == {"layout": "reference"}
    (account,) = manifest["imports"]
    assert any(d.startswith("model_final.pth: betas") and "(12 tensors)" in d for d in account["dropped"])
    modules = imported("layout", radm_weights)
    for prefix, part in (("backbone.", "layout_backbone"), ("head.", "layout_head")):
        state = modules[part].state_dict()
        source = {k.removeprefix(prefix): v for k, v in sources.radm_model.items() if k.startswith(prefix)}
        assert state.keys() == source.keys(), part  # 1:1, frozen BN without num_batches_tracked
        assert all(torch.equal(state[k], source[k]) for k in source), part
    preset = resolve_preset("tiny", WeightsSource(path=radm_weights))
    assert (preset.layout.cascade, preset.layout.hidden, preset.layout.num_boxes) == (2, 32, 100)
    assert preset.layout.proposal_frame == "hwhw"  # the reference's (c, w, h) reading, recorded by the import


def test_radm_import_generates_a_layout(radm_weights, tmp_path, product_png):
    pipe = load_pipeline("layout", preset="tiny", weights=radm_weights, cache_dir=tmp_path / "cache")
    # a non-square canvas (128x160), where RADM's proposal frame differs from the canvas's: a
    # user-fixed box still comes out exactly, the planned ones inside the canvas
    fixed = tmp_path / "fixed.json"
    fixed.write_text(json.dumps([{"class": "logo", "box": [4.5, 130, 40, 156]}]))
    result = generate(pipe, product=product_png, text=["40% off", "Breathable mesh"], layout_steps=2,
                      layout_fixed=fixed)
    assert set(result.report["weights_parts"]) == {"text_encoder", "layout_backbone", "layout_head"}
    assert all(s.startswith("trained") for s in result.report["weights_parts"].values())
    assert result.report["processing"] == "reference"
    elements = result.report["layout"]["elements"]
    assert (elements[0]["class"], elements[0]["box"], elements[0]["fixed"]) == ("logo", [4.5, 130, 40, 156], True)
    assert all(0 <= e["box"][0] < e["box"][2] <= 128 and 0 <= e["box"][1] < e["box"][3] <= 160 for e in elements)


def test_radm_without_text_encoder_runs_only_with_allow_random(sources, tmp_path):
    out = tmp_path / "radm"
    assert run_import("radm", "--checkpoint", str(sources.radm), "--out", str(out)) == 0
    with pytest.raises(WeightsError, match="holds no trained text_encoder .* --allow-random text_encoder"):
        load_pipeline("layout", preset="tiny", weights=out, cache_dir=tmp_path / "cache")
    preset = resolve_preset("tiny", WeightsSource(path=out, allow_random=frozenset({"text_encoder"})))
    assert preset.text.hidden_size == ck.TINY.radm["text_dim"]  # the random encoder is as wide as the head reads


def test_sd_and_controlnet_parts_equal_the_library_classes(sources, poster_weights):
    from diffusers import ControlNetModel, UNet2DConditionModel
    from torch import nn

    manifest = read_weights_manifest(poster_weights)
    assert set(manifest["parts"]) == {"text_encoder", "vae", "poster_unet", "controlnet"}
    assert "processing" not in manifest or manifest["processing"] == {}
    assert [i["family"] for i in manifest["imports"]] == ["sd", "controlnet"]
    assert any("controlnet_cond_embedding" in d for d in manifest["imports"][1]["dropped"])
    allowed = frozenset({"plannet", "render_cond", "image_encoder"})
    modules = imported("poster", poster_weights, allowed)
    torch.manual_seed(1)
    with torch.inference_mode():
        sample, t, context = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 20.0]), torch.randn(2, 77, 64)
        controlnet = ControlNetModel.from_pretrained(sources.controlnet).eval()
        controlnet.controlnet_cond_embedding = nn.Identity()  # what the import drops: RenderNet takes its place
        cond = torch.randn(2, 32, 8, 8)
        down, mid = controlnet(sample, t, encoder_hidden_states=context, controlnet_cond=cond, return_dict=False)
        residuals = modules["controlnet"](sample, t, context, cond, torch.ones(2))
        for i, (got, expected) in enumerate(zip(residuals, (*down, mid))):
            close(got, expected, f"controlnet residual {i}")
        unet = UNet2DConditionModel.from_pretrained(sources.sd / "unet").eval()
        expected = unet(sample, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample
        close(modules["poster_unet"](sample, t, context, *down, mid), expected, "poster_unet")


def test_sd_single_file_imports_to_the_tensors_of_its_diffusers_folder(sources, poster_weights, tmp_path):
    from safetensors.torch import load_file

    from runtime.artifacts.weights import part_weights_path

    out = tmp_path / "single"
    assert run_import("sd", "--checkpoint", str(sources.single_file), "--config", str(sources.sd), "--out", str(out)) == 0
    account = read_weights_manifest(out)["imports"][0]
    assert any("model_ema.*" in d for d in account["dropped"]) and any("alphas_cumprod" in d for d in account["dropped"])
    for part in ("text_encoder", "vae", "poster_unet"):
        single, folder = load_file(part_weights_path(out, part)), load_file(part_weights_path(poster_weights, part))
        assert single.keys() == folder.keys(), part
        assert all(torch.equal(single[k], folder[k]) for k in folder), part


def test_single_file_without_config_is_refused(sources, tmp_path, capsys):
    assert run_import("sd", "--checkpoint", str(sources.single_file), "--out", str(tmp_path / "w")) == 1
    assert "give --config, a local diffusers folder of the same model" in capsys.readouterr().err


def test_partly_trained_poster_exports_and_generates_with_allow_random(poster_weights, tmp_path, product_png):
    with pytest.raises(WeightsError, match="holds no trained image_encoder, plannet, render_cond"):
        load_pipeline("poster", preset="tiny", weights=poster_weights, cache_dir=tmp_path / "cache")
    pipe = load_pipeline("poster", preset="tiny", weights=poster_weights, cache_dir=tmp_path / "cache",
                         allow_random=["plannet", "render_cond", "image_encoder"])
    result = generate(pipe, product=product_png, prompt="studio", text=["40% off"], steps=2, layout_steps=1)
    parts = result.report["weights_parts"]
    assert parts["plannet"] == parts["render_cond"] == parts["image_encoder"] == "random init (seed 0)"
    assert parts["controlnet"].startswith("trained (controlnet/") and parts["poster_unet"].startswith("trained (unet/")


def test_pickle_that_runs_code_when_loaded_is_refused(tmp_path, capsys):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": {"unet.conv_in.weight": torch.zeros(1)}, "hook": ck.MakesDirectory(marker)}, evil)
    code = run_import("refadgen", "--checkpoint", str(evil), "--base", str(tmp_path), "--vae", str(tmp_path),
                      "--image-encoder", str(tmp_path), "--out", str(tmp_path / "w"))
    err = capsys.readouterr().err
    assert code == 1 and "refusing" in err and "mkdir" in err and "a pickle can run code" in err
    assert not marker.exists()
    assert not (tmp_path / "w").exists()


def test_folder_with_only_a_bin_is_read_without_running_code(sources, tmp_path):
    """transformers-4 folders sometimes hold only pytorch_model.bin: read with weights_only."""
    from safetensors.torch import load_file

    folder = tmp_path / "text_encoder"
    shutil.copytree(sources.sd / "text_encoder", folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    shutil.copytree(sources.sd / "tokenizer", tmp_path / "tokenizer")
    out = tmp_path / "radm"
    assert run_import("radm", "--checkpoint", str(sources.radm), "--text-encoder", str(folder), "--out", str(out)) == 0
    assert "text_encoder/pytorch_model.bin" in read_weights_manifest(out)["sources"]


def test_import_never_replaces_a_part(sources, radm_weights, tmp_path):
    before = json.loads((radm_weights / "adgen-weights.json").read_text())
    with pytest.raises(WeightsError, match="already holds layout_backbone, layout_head"):
        from export.importers import import_family

        import_family("radm", radm_weights, checkpoint=sources.radm, text_encoder=None)
    assert json.loads((radm_weights / "adgen-weights.json").read_text()) == before
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(WeightsError, match="exists and is not an adgen weights folder"):
        from export.importers import import_family

        import_family("radm", tmp_path, checkpoint=sources.radm, text_encoder=None)
