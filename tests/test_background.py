"""The background pipeline (category-common + personalized style) on tiny: parity of every
component, the style branch's masking, the mask-aware attention, once-per-request work, both
backends with and without a reference, exact product pixels, categories, and clear errors."""

from __future__ import annotations

import json
import shutil

import fixtures
import numpy as np
import pytest
from counting import Counting
from graph_parity import assert_graph_matches_module, assert_parity_report_format
from PIL import Image

from runtime.api import generate
from runtime.artifacts.graphs import MANIFEST, graph_path
from runtime.artifacts.weights import WeightsSource
from runtime.cli import main
from runtime.errors import InputError
from runtime.inputs.categories import Category, get_category, load_categories, prompt_tokens
from runtime.inputs.images import load_product, resize_mask_nearest
from runtime.inputs.tokenizer import HashTokenizer
from runtime.pipelines.background import BackgroundPipeline, BackgroundRequest, load_reference
from runtime.specs.background import background_specs, style_residual_layout, style_residual_names
from runtime.specs.core import Precision

STEPS = 3
# torch and ONNX Runtime differ by float rounding only (as for RefAdGen): after a few guided
# steps on tiny the decoded images agree to within 2 grey levels per pixel, 0.05 on average.
MAX_LEVELS, MEAN_LEVELS = 2, 0.05
COMPONENTS = ("text_encoder", "vae_encoder", "style_branch", "background_unet", "vae_decoder")


@pytest.fixture(scope="session")
def bg_specs(tiny):
    return background_specs(tiny)


bg_modules = fixtures.networks("background")
bg_graphs = fixtures.exported("background")
bg_ort = fixtures.opened("background")
bg_torch = fixtures.opened("background", "torch")


@pytest.fixture
def reference_png(tmp_path):
    """A textured reference ad at twice tiny's canvas (same aspect ratio) and its product mask."""
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, size=(320, 256, 3), dtype=np.uint8)
    rgb[:, :128] //= 4  # a dark left half: a layout the branch can pick up
    mask = np.zeros((320, 256), dtype=np.uint8)
    mask[100:220, 60:200] = 255
    Image.fromarray(rgb).save(tmp_path / "reference.png")
    Image.fromarray(mask).save(tmp_path / "reference_mask.png")
    return tmp_path / "reference.png", tmp_path / "reference_mask.png"


def _request(product_png, reference=None, seed=0, category="sneakers", **kw):
    product = load_product(product_png)
    ref = None if reference is None else load_reference(reference[0], product.width, product.height, reference[1])
    return BackgroundRequest(product, get_category(category), ref, seed=seed, **kw)


@pytest.mark.parametrize("component", COMPONENTS)
def test_every_component_passes_fp32_parity(bg_graphs, bg_specs, bg_modules, component):
    assert_graph_matches_module(
        graph_path(bg_graphs, component), bg_modules[component], bg_specs[component], Precision.FP32
    )


def test_parity_report_lists_every_component_and_output(bg_graphs, bg_specs):
    assert_parity_report_format(bg_graphs, bg_specs, Precision.FP32)


def test_manifest_records_the_background_specs(bg_graphs, bg_specs):
    manifest = json.loads((bg_graphs / MANIFEST).read_text())
    assert manifest["key"]["pipeline"] == "background"
    for name, spec in bg_specs.items():
        assert manifest["components"][name]["spec_hash"] == spec.spec_hash()


def test_spec_declares_the_branch_a_per_request_invariant(bg_specs, tiny):
    branch, unet = bg_specs["style_branch"], bg_specs["background_unet"]
    assert all(t.invariant for t in branch.inputs + branch.outputs)
    names = style_residual_names(tiny)
    assert branch.output_names == names and len(names) == 13
    for name in names:  # the per-step graph takes exactly the branch's outputs, as invariants
        assert unet.tensor(name).invariant and unet.tensor(name).shape == branch.tensor(name).shape
    assert not unet.tensor("sample").invariant and not unet.tensor("timestep").invariant


@pytest.mark.parametrize("preset_name", ["tiny", "small", "sd15"])
def test_specs_validate_their_sample_inputs_at_every_preset(preset_name):
    from runtime.presets import get_preset

    for spec in background_specs(get_preset(preset_name)).values():
        for point in ("min", "opt", "max"):
            env = spec.env_at(point)
            assert spec.validate_inputs(spec.sample_inputs(np.random.default_rng(0), env)) == env, (spec.name, point)


def test_residual_layout_is_sd15_controlnets():
    from runtime.presets import get_preset

    sd15 = get_preset("sd15")
    # diffusers' ControlNetModel on SD 1.5: conv_in, then per down block its resnets and downsampler, then mid
    assert [c for _, c in style_residual_layout(sd15)] == [320] * 4 + [640] * 3 + [1280] * 6
    assert [lvl for lvl, _ in style_residual_layout(sd15)] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3]
    spec = background_specs(sd15)["style_branch"]
    env = spec.env_at("opt", latent_h=80, latent_w=64)
    assert spec.shape("style_down_03", env) == (2, 320, 40, 32) and spec.shape("style_mid", env) == (2, 1280, 10, 8)


def test_attention_forms_export_the_nodes_they_name(bg_graphs, bg_specs, bg_modules, tmp_path):
    onnx = pytest.importorskip("onnx")
    from export.onnx_export import export_component
    from runtime.specs.core import AttentionKernel

    fused = [n.op_type for n in onnx.load(str(graph_path(bg_graphs, "background_unet"))).graph.node]
    assert fused.count("MultiHeadAttention") == 32 and "Softmax" not in fused  # 16 self + 16 mask-aware cross
    path = tmp_path / "background_unet.onnx"
    export_component(bg_modules["background_unet"], bg_specs["background_unet"], path, 17, AttentionKernel.ONNX)
    portable = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "MultiHeadAttention" not in portable and portable.count("Softmax") == 32
    assert_graph_matches_module(path, bg_modules["background_unet"], bg_specs["background_unet"], Precision.FP32)


def _max_pool(mask: np.ndarray) -> np.ndarray:
    h, w = mask.shape
    padded = np.zeros((h + h % 2, w + w % 2), dtype=mask.dtype)
    padded[:h, :w] = mask
    return padded.reshape(padded.shape[0] // 2, 2, padded.shape[1] // 2, 2).max(axis=(1, 3))


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_style_residuals_are_zero_on_the_product_at_every_scale(backend, bg_ort, bg_torch, tiny, product_png):
    branch = {"onnxruntime": bg_ort, "torch": bg_torch}[backend].runner.components["style_branch"]
    spec = branch.spec
    feed = spec.sample_inputs(np.random.default_rng(0), spec.env_at("opt", B=1))
    h, w = feed["product_mask"].shape[-2:]
    mask = resize_mask_nearest(load_product(product_png).mask, h, w)
    feed["product_mask"] = mask[None, None]
    feed["reference_mask"] = np.zeros_like(feed["reference_mask"])
    out = branch.run(feed)
    pyramid = [mask]
    for _ in range(3):
        pyramid.append(_max_pool(pyramid[-1]))
    for name, (level, _) in zip(style_residual_names(tiny), style_residual_layout(tiny)):
        product = pyramid[level].astype(bool)
        residual = out[name][0]  # (C, h_l, w_l)
        assert residual.shape[1:] == product.shape, name
        assert product.any() and (~product).any()
        assert np.all(residual[:, product] == 0), name
        assert np.mean(residual[:, ~product] != 0) > 0.99, name  # random init: the branch is not trivially zero


def test_mask_aware_attention_routes_class_and_identifier_tokens(bg_modules):
    torch = pytest.importorskip("torch")
    from networks.background import MaskAwareCrossAttention, token_bias

    unet = bg_modules["background_unet"]
    attn = unet.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    g = torch.Generator().manual_seed(0)
    mask = (torch.rand(1, 1, 6, 5, generator=g) > 0.5).float()
    product = mask.flatten().bool()
    cls, ident = torch.zeros(1, 77), torch.zeros(1, 77)
    cls[0, 4], ident[0, 9] = 1.0, 1.0
    hidden = torch.randn(1, 30, attn.to_q.in_features, generator=g)
    text = torch.randn(1, 77, attn.to_k.in_features, generator=g)
    processor = MaskAwareCrossAttention(0, [token_bias(mask, cls, ident)])

    def run(context):
        with torch.no_grad():
            return processor(attn, hidden, context)[0]

    base = run(text)
    new_identifier, new_class = text.clone(), text.clone()
    new_identifier[0, 9] += 3.0
    new_class[0, 4] += 3.0
    moved_d, moved_c = run(new_identifier), run(new_class)
    assert torch.equal(moved_d[product], base[product])  # D is invisible from the product
    assert (moved_d[~product] - base[~product]).abs().amax(dim=1).min() > 1e-4  # every background position sees it
    assert torch.equal(moved_c[~product], base[~product])  # C is invisible from the background
    assert (moved_c[product] - base[product]).abs().amax(dim=1).min() > 1e-4


def test_product_pixels_are_exact_with_and_without_reference(bg_ort, product_png, reference_png):
    product = load_product(product_png)
    for kw in ({}, {"reference": reference_png[0], "reference_mask": reference_png[1]}):
        image = generate(bg_ort, product=product_png, category="sneakers", steps=2, **kw).image
        assert image.shape == (160, 128, 3)
        assert np.array_equal(image[product.mask], product.rgb[product.mask])
        assert not np.array_equal(image[~product.mask], product.rgb[~product.mask])


@pytest.mark.parametrize("with_reference", [False, True])
def test_torch_and_onnxruntime_agree_with_and_without_reference(with_reference, bg_ort, bg_torch, product_png, reference_png):
    request = [_request(product_png, reference_png if with_reference else None, seed=2)]
    a = bg_ort.runner(request, steps=STEPS).generated[0].astype(int)
    b = bg_torch.runner(request, steps=STEPS).generated[0].astype(int)
    diff = np.abs(a - b)
    assert diff.max() <= MAX_LEVELS and diff.mean() <= MEAN_LEVELS, (diff.max(), diff.mean())


def test_reference_category_and_style_scale_change_the_background(bg_ort, product_png, reference_png):
    run = bg_ort.runner
    plain = run([_request(product_png)], steps=2).generated[0].astype(int)
    styled = run([_request(product_png, reference_png)], steps=2).generated[0].astype(int)
    zero_scale = run([_request(product_png, reference_png, style_scale=0.0)], steps=2).generated[0].astype(int)
    other = run([_request(product_png, category="perfume")], steps=2).generated[0].astype(int)
    assert np.abs(plain - styled).mean() > 0.5
    assert np.abs(plain - other).mean() > 0.5
    assert np.abs(plain - zero_scale).max() <= 1  # scale 0 is the category-common branch alone


def test_style_branch_runs_once_per_request_and_guidance_is_one_batch(bg_ort, product_png, reference_png):
    counted = {name: Counting(c) for name, c in bg_ort.runner.components.items()}
    pipe = BackgroundPipeline(counted, bg_ort.runner.preset, bg_ort.runner.tokenizer)
    pipe([_request(product_png, reference_png), _request(product_png, reference_png, seed=1)], steps=4)
    assert counted["style_branch"].calls == 1 and counted["style_branch"].batches == [2]
    assert counted["background_unet"].calls == 4 and set(counted["background_unet"].batches) == {4}
    assert counted["vae_encoder"].batches == [4]  # two products and two references in one call
    for once in ("text_encoder", "vae_decoder"):
        assert counted[once].calls == 1, once
    pipe([_request(product_png)], steps=2)
    assert counted["style_branch"].calls == 1  # no reference: the branch does not run


def test_request_result_does_not_depend_on_the_batch(bg_ort, product_png, reference_png):
    run = bg_ort.runner
    alone = run([_request(product_png, reference_png, seed=5)], steps=2).generated[0].astype(int)
    batch = run([_request(product_png, seed=1), _request(product_png, reference_png, seed=5)], steps=2).generated
    assert np.abs(alone - batch[1]).max() <= 1


def test_report_has_every_stage(bg_ort, product_png, reference_png):
    report = generate(bg_ort, product=product_png, category="sneakers", reference=reference_png[0], steps=2, seed=4).report
    timings = report["timings_s"]
    once = ("text_encode", "vae_encode", "style_branch", "vae_decode", "compose")
    # every stage is timed once, inside the total (loading the inputs comes before it)
    assert sum(timings[stage] for stage in once) + timings["denoise_step"]["total"] <= timings["total"]
    assert set(timings) == {"load_inputs", "total", "denoise_step", *once}
    assert len(timings["denoise_step"]["samples"]) == 2
    assert (report["pipeline"], report["backend"], report["seed"]) == ("background", "onnxruntime", 4)
    assert report["category"]["prompt"] == "a photo of sneakers in the background of sks"
    assert report["reference"]["size"] == [256, 320] and report["reference"]["mask"].startswith("none")
    plain = generate(bg_ort, product=product_png, category="sneakers", steps=1).report
    assert plain["reference"] is None and "style_branch" not in plain["timings_s"]


def test_cli_writes_image_and_report(bg_graphs, cache_root, product_png, reference_png, tmp_path):
    out = tmp_path / "bg.png"
    code = main(["generate", "--pipeline", "background", "--product", str(product_png), "--category", "sneakers",
                 "--reference", str(reference_png[0]), "--reference-mask", str(reference_png[1]), "--steps", "2",
                 "--out", str(out), "--cache-dir", str(cache_root), "--quiet"])
    assert code == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert np.asarray(Image.open(out)).shape == (160, 128, 3)
    assert report["reference"]["mask"] == str(reference_png[1])


def test_reference_loading_greys_its_product_and_resizes_to_the_canvas(reference_png):
    ref = load_reference(reference_png[0], 128, 160, reference_png[1])
    assert ref.rgb.shape == (160, 128, 3) and ref.size == (256, 320)
    assert ref.mask[50:110, 30:100].all() and not ref.mask[:40].any()
    assert np.all(ref.rgb[ref.mask] == 127)
    whole = load_reference(reference_png[0], 128, 160)
    assert not whole.mask.any()


def test_prompt_tokens_mark_multi_word_nouns_and_the_identifier():
    tokenizer = HashTokenizer(49408, 77)
    category = Category("perfume", "perfume bottle", "vjq")
    tokens = prompt_tokens(tokenizer, category)
    # BOS, a photo of, perfume bottle, in the background of, vjq
    assert np.flatnonzero(tokens.class_tokens).tolist() == [4, 5]
    assert np.flatnonzero(tokens.identifier_tokens).tolist() == [10]
    assert np.array_equal(tokens.ids[4:6], tokenizer(["perfume bottle"])[0][1:3])
    assert tokens.ids[10] == tokenizer(["vjq"])[0][1]


def test_user_categories_extend_and_override_the_table(tmp_path):
    path = tmp_path / "cats.json"
    path.write_text(json.dumps({"Kettle": {"noun": "electric kettle", "identifier": "qvw"},
                                "sneakers": {"noun": "running shoes", "identifier": "sks"}}))
    table = load_categories(path)
    assert table["kettle"] == Category("kettle", "electric kettle", "qvw")
    assert table["sneakers"].noun == "running shoes" and "watch" in table
    assert get_category("KETTLE", path).identifier == "qvw"


@pytest.mark.parametrize("content,rule", [
    ("[1, 2]", "expected a JSON object"),
    ("{not json", "expected a JSON object"),
    ('{"kettle": {"noun": "kettle"}}', "exactly the keys noun and identifier"),
    ('{"kettle": {"noun": "kettle", "identifier": "two words"}}', "identifier"),
    ('{"kettle": {"noun": "kettle", "identifier": "sks"}}', "identifier 'sks' is used by both"),
    ('{"kettle": {"noun": "a\\u0007b", "identifier": "qvw"}}', "noun"),
])
def test_bad_category_files_are_named(tmp_path, content, rule):
    path = tmp_path / "cats.json"
    path.write_text(content)
    with pytest.raises(InputError) as excinfo:
        load_categories(path)
    assert excinfo.value.field == "categories" and rule in str(excinfo.value)


def _bad_inputs(tmp_path, reference_png):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    square = tmp_path / "square.png"
    Image.new("RGB", (200, 200), (10, 20, 30)).save(square)
    small_mask = tmp_path / "small_mask.png"
    Image.new("L", (128, 160), 255).save(small_mask)
    full_mask = tmp_path / "full_mask.png"
    Image.new("L", (256, 320), 255).save(full_mask)
    ref, ref_mask = (str(p) for p in reference_png)
    return {
        "unknown category": (["--category", "spaceship"], "category", "expected one of"),
        "reference not an image": (["--reference", str(text)], "reference", "not a recognized image"),
        "reference missing": (["--reference", str(tmp_path / "nope.png")], "reference", "file not found"),
        "reference of another aspect": (["--reference", str(square)], "reference", "expected the canvas size 128x160"),
        "reference mask of another size": (["--reference", ref, "--reference-mask", str(small_mask)], "reference_mask",
                                           "expected the reference's size 256x320"),
        "reference mask covers it all": (["--reference", ref, "--reference-mask", str(full_mask)], "reference_mask",
                                         "covers the whole reference"),
        "reference mask without reference": (["--reference-mask", ref_mask], "reference_mask", "only read with --reference"),
        "style scale without reference": (["--style-scale", "0.5"], "style_scale", "only read with --reference"),
        "style scale out of range": (["--reference", ref, "--style-scale", "9"], "style_scale", "expected a number"),
        "categories file missing": (["--categories", str(tmp_path / "none.json")], "categories", "file not found"),
        "prompt is not an option": (["--prompt", "a beach"], "prompt", "not an option of pipeline background"),
    }


CASES = [
    "unknown category", "reference not an image", "reference missing", "reference of another aspect",
    "reference mask of another size", "reference mask covers it all", "reference mask without reference",
    "style scale without reference", "style scale out of range", "categories file missing", "prompt is not an option",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gets_a_clear_error_and_exit_code_2(case, product_png, reference_png, tmp_path, capsys):
    extra, field, rule = _bad_inputs(tmp_path, reference_png)[case]
    argv = ["generate", "--pipeline", "background", "--product", str(product_png), "--out", str(tmp_path / "bg.png"),
            "--cache-dir", str(tmp_path / "no-cache"), "--quiet"]
    if "--category" not in extra:
        argv += ["--category", "sneakers"]
    code = main([*argv, *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith(f"adgen: error: {field}") and rule in err[-1], err
    assert not (tmp_path / "bg.png").exists()
    assert not (tmp_path / "no-cache").exists()  # rejected before any model was built or exported


def test_saved_weights_load_back_to_identical_outputs(tiny, bg_modules, bg_specs, tmp_path):
    pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file

    from networks.common.runner import run_module
    from networks.registry import build_modules, save_random_weights
    from runtime.errors import WeightsError

    save_random_weights("background", tiny, 0, tmp_path / "w")
    loaded = build_modules("background", tiny, WeightsSource(path=tmp_path / "w"))
    for name in ("style_branch", "background_unet"):
        feed = bg_specs[name].sample_inputs(np.random.default_rng(5), bg_specs[name].env_at("min", B=1))
        a, b = run_module(bg_modules[name], bg_specs[name], feed), run_module(loaded[name], bg_specs[name], feed)
        for key in a:
            assert np.array_equal(a[key], b[key]), (name, key)
    branch = tmp_path / "w" / "style_branch" / "model.safetensors"
    state = load_file(branch)
    del state["output_convs.3.weight"]
    save_file(state, branch)
    with pytest.raises(WeightsError, match="style_branch/model.safetensors: keys do not match.*output_convs.3.weight"):
        build_modules("background", tiny, WeightsSource(path=tmp_path / "w"))
    shutil.rmtree(tmp_path / "w")
