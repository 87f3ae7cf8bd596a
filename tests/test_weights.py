"""Weights: random init is deterministic, a saved folder loads back to the same networks, the
fingerprint follows the bytes, and every bad folder (missing, pickled, corrupt, not a weights
folder, mismatched keys or shapes) is a WeightsError that says what is wrong. The fingerprint
is torch-free and so are its tests on hand-made folders; building networks needs torch."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from runtime.artifacts.weights import WEIGHTS_MANIFEST, WeightsSource, write_weights_manifest
from runtime.errors import WeightsError

UNET_FILE = "unet/model.safetensors"
CONV_IN_KEY = "unet.conv_in.weight"


@pytest.fixture(scope="module")
def saved_folder(tmp_path_factory, torch) -> Path:
    """tiny's random RefAdGen networks (seed 0) written once as a weights folder; tests copy it
    before changing it."""
    from networks.registry import save_random_weights
    from runtime.presets import get_preset

    return save_random_weights("refadgen", get_preset("tiny"), 0, tmp_path_factory.mktemp("tiny-weights"))


@pytest.fixture
def weights_copy(saved_folder, tmp_path) -> Path:
    root = tmp_path / "weights"
    shutil.copytree(saved_folder, root)
    return root


def edit_safetensors(path: Path, edit) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    state = safetensors_torch.load_file(path)
    edit(state)
    safetensors_torch.save_file(state, path)


def edit_unet_file(root: Path, edit) -> None:
    edit_safetensors(root / UNET_FILE, edit)


def build_refadgen(preset, weights: WeightsSource):
    """The RefAdGen modules (networks.registry.build_modules); skips without torch."""
    pytest.importorskip("torch")
    from networks.registry import build_modules

    return build_modules("refadgen", preset, weights)


def hand_made_folder(root: Path, files: dict[str, bytes]) -> Path:
    """A folder with `files` and a manifest that lists no part (enough for the fingerprint)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    write_weights_manifest(root, {"parts": {}})
    return root


def load_error(tiny, root: Path) -> str:
    with pytest.raises(WeightsError) as excinfo:
        build_refadgen(tiny, WeightsSource(path=root))
    return str(excinfo.value)


def state_dicts(modules) -> dict[str, dict]:
    return {name: module.state_dict() for name, module in modules.items()}


class MakesDirectory:
    """Unpickling this creates `path`: evidence that a pickled file was loaded."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_saved_folder_loads_back_to_identical_outputs(tiny, tiny_specs, tiny_modules, saved_folder):
    from networks.common.runner import run_module

    loaded = build_refadgen(tiny, WeightsSource(path=saved_folder))
    assert set(loaded) == set(tiny_modules)
    for name, spec in tiny_specs.items():
        feed = spec.sample_inputs(np.random.default_rng(3), spec.env_at("min"))
        expected = run_module(tiny_modules[name], spec, feed)
        got = run_module(loaded[name], spec, feed)
        for output in spec.output_names:
            np.testing.assert_array_equal(got[output], expected[output], err_msg=f"{name}.{output}")


def test_saved_folder_loads_back_to_identical_state_dicts(tiny, tiny_modules, saved_folder, torch):
    loaded = state_dicts(build_refadgen(tiny, WeightsSource(path=saved_folder)))
    for name, state in state_dicts(tiny_modules).items():
        assert loaded[name].keys() == state.keys(), name
        for key, tensor in state.items():
            assert torch.equal(loaded[name][key], tensor), f"{name}.{key}"


def test_folder_fingerprint_is_stable_and_independent_of_location(saved_folder, weights_copy):
    fingerprint = WeightsSource(path=saved_folder).fingerprint("tiny")
    assert WeightsSource(path=saved_folder).fingerprint("tiny") == fingerprint
    assert WeightsSource(path=weights_copy).fingerprint("tiny") == fingerprint


@pytest.mark.parametrize(
    "relative", [UNET_FILE, "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json"]
)
def test_folder_fingerprint_changes_when_one_byte_changes(saved_folder, weights_copy, relative):
    path = weights_copy / relative
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    assert WeightsSource(path=weights_copy).fingerprint("tiny") != WeightsSource(path=saved_folder).fingerprint("tiny")


def test_folder_fingerprint_separates_file_boundaries(tmp_path):
    two_files = hand_made_folder(tmp_path / "two", {"a.safetensors": b"P", "b.json": b"Q"})
    one_file = hand_made_folder(tmp_path / "one", {"a.safetensors": b"Pb.jsonQ"})
    assert WeightsSource(path=two_files).fingerprint("tiny") != WeightsSource(path=one_file).fingerprint("tiny")


def test_folder_fingerprint_depends_on_the_parts_allowed_random_and_their_seed(saved_folder):
    trained = WeightsSource(path=saved_folder).fingerprint("tiny")
    random_unet = WeightsSource(path=saved_folder, allow_random=frozenset({"unet"})).fingerprint("tiny")
    other_seed = WeightsSource(seed=1, path=saved_folder, allow_random=frozenset({"unet"})).fingerprint("tiny")
    assert len({trained, random_unet, other_seed}) == 3
    assert WeightsSource(seed=1, path=saved_folder).fingerprint("tiny") == trained  # no random part: no seed


def test_folder_fingerprint_differs_from_random_init(saved_folder):
    assert WeightsSource(path=saved_folder).fingerprint("tiny") != WeightsSource(seed=0).fingerprint("tiny")


def test_random_init_fingerprint_depends_on_seed_and_preset():
    fingerprints = {WeightsSource(seed=seed).fingerprint(preset) for seed in (0, 1, 2) for preset in ("tiny", "small")}
    assert len(fingerprints) == 6
    assert WeightsSource(seed=0).fingerprint("tiny") == WeightsSource(seed=0).fingerprint("tiny")


def test_missing_key_is_named(tiny, weights_copy):
    edit_unet_file(weights_copy, lambda state: state.pop(CONV_IN_KEY))
    message = load_error(tiny, weights_copy)
    assert UNET_FILE in message
    assert "1 missing" in message
    assert "'unet.conv_in.weight'" in message


def test_unexpected_key_in_a_part_is_named(tiny, weights_copy, torch):
    edit_unet_file(weights_copy, lambda state: state.update({"unet.extra.weight": torch.zeros(3)}))
    message = load_error(tiny, weights_copy)
    assert "1 unexpected" in message
    assert "'unet.extra.weight'" in message


def test_wrong_shape_is_named_with_both_shapes(tiny, weights_copy, torch):
    edit_unet_file(weights_copy, lambda state: state.update({CONV_IN_KEY: torch.zeros(32, 4, 3, 3)}))
    message = load_error(tiny, weights_copy)
    assert "1 with wrong shape" in message
    assert "unet.conv_in.weight expected (32, 5, 3, 3), got (32, 4, 3, 3)" in message


def test_wrong_shape_in_the_vae_is_named(tiny, weights_copy, torch):
    edit_safetensors(weights_copy / "vae" / "diffusion_pytorch_model.safetensors",
                     lambda state: state.update({"decoder.conv_out.bias": torch.zeros(4)}))
    message = load_error(tiny, weights_copy)
    assert "decoder.conv_out.bias expected (3,), got (4,)" in message


@pytest.mark.parametrize(
    "relative",
    ["pytorch_model.bin", "text_encoder/pytorch_model.bin", "vae/model.ckpt", "unet.pt", "extra/deep/weights.pth"],
)
def test_pickled_file_anywhere_is_refused_without_being_read(tiny, weights_copy, tmp_path, relative):
    marker = tmp_path / "unpickled"
    path = weights_copy / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(MakesDirectory(marker)))
    message = load_error(tiny, weights_copy)
    assert "refusing pickled weights" in message
    assert "pickle can run code" in message
    assert relative in message
    assert not marker.exists()


def test_pickled_file_of_garbage_is_refused_not_unpickled(tiny, weights_copy):
    (weights_copy / "pytorch_model.bin").write_bytes(b"\x80\x05garbage, not a pickle")
    message = load_error(tiny, weights_copy)
    assert message.startswith("refusing pickled weights")


def test_fingerprint_refuses_a_pickled_folder(tmp_path):
    hand_made_folder(tmp_path, {"model.safetensors": b"safetensors stand-in"})
    WeightsSource(path=tmp_path).fingerprint("tiny")  # accepted until a pickle joins it
    (tmp_path / "pytorch_model.bin").write_bytes(b"garbage")
    with pytest.raises(WeightsError, match="refusing pickled weights .*pytorch_model.bin"):
        WeightsSource(path=tmp_path).fingerprint("tiny")


@pytest.mark.parametrize("corrupt", ["garbage", "truncated"])
def test_corrupt_safetensors_file_is_a_weights_error(tiny, weights_copy, corrupt):
    path = weights_copy / UNET_FILE
    data = path.read_bytes()
    path.write_bytes(b"\x00not safetensors" * 64 if corrupt == "garbage" else data[: len(data) // 2])
    message = load_error(tiny, weights_copy)
    assert f"cannot read {path} as safetensors" in message


def test_missing_part_file_is_a_weights_error(tiny, weights_copy):
    (weights_copy / UNET_FILE).unlink()
    message = load_error(tiny, weights_copy)
    assert f"the manifest lists part unet but {weights_copy / UNET_FILE} is missing" in message


def test_part_missing_from_the_folder_is_refused_unless_allowed_random(tiny, weights_copy, tiny_modules, torch):
    manifest = json.loads((weights_copy / WEIGHTS_MANIFEST).read_text())
    del manifest["parts"]["unet"]
    (weights_copy / WEIGHTS_MANIFEST).write_text(json.dumps(manifest))
    message = load_error(tiny, weights_copy)
    assert "holds no trained unet" in message and "--allow-random unet" in message
    built = build_refadgen(tiny, WeightsSource(path=weights_copy, allow_random=frozenset({"unet"})))
    for key, tensor in tiny_modules["unet"].state_dict().items():  # random init, seed 0, as without a folder
        assert torch.equal(built["unet"].state_dict()[key], tensor), key


def test_missing_folder_is_a_weights_error(tiny, tmp_path):
    missing = tmp_path / "no-such-weights"
    message = load_error(tiny, missing)
    assert f"weights folder {missing} does not exist" in message


def test_fingerprint_of_a_missing_folder_is_a_weights_error(tmp_path):
    missing = tmp_path / "no-such-weights"
    with pytest.raises(WeightsError, match=f"weights folder {missing} does not exist"):
        WeightsSource(path=missing).fingerprint("tiny")


def test_folder_without_manifest_is_a_weights_error(tiny, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    message = load_error(tiny, tmp_path)
    assert f"{tmp_path} is not an adgen weights folder (no {WEIGHTS_MANIFEST}): make one with `adgen import`" in message


def test_fingerprint_of_a_folder_without_manifest_is_a_weights_error(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"x")
    with pytest.raises(WeightsError, match="is not an adgen weights folder"):
        WeightsSource(path=tmp_path).fingerprint("tiny")


def test_random_init_is_deterministic_per_seed(tiny, tiny_modules, torch):
    again = state_dicts(build_refadgen(tiny, WeightsSource(seed=0)))
    for name, state in state_dicts(tiny_modules).items():
        assert again[name].keys() == state.keys(), name
        for key, tensor in state.items():
            assert torch.equal(again[name][key], tensor), f"{name}.{key}"


def test_random_init_differs_between_seeds(tiny, tiny_modules, torch):
    other = state_dicts(build_refadgen(tiny, WeightsSource(seed=1)))
    for name, state in state_dicts(tiny_modules).items():
        differing = [key for key, tensor in state.items() if not torch.equal(other[name][key], tensor)]
        assert differing, f"{name}: seed 1 gave the same weights as seed 0"


def test_generation_unet_has_16_afm_processors_in_its_state_dict(tiny_modules):
    unet = tiny_modules["unet"]
    assert len(unet.afm) == 16
    state = unet.state_dict()
    for projection in ("to_k_ref", "to_v_ref"):
        keys = [key for key in state if projection in key]
        assert len(keys) == 16, projection
        assert all(key.endswith(f"attn1.processor.{projection}.weight") for key in keys)
    afm_kv_keys = tiny_modules["afm_kv"].state_dict()
    assert len(afm_kv_keys) == 32


def test_afm_kv_shares_its_parameters_with_the_generation_unet(tiny_modules):
    unet_params = {id(p) for p in tiny_modules["unet"].parameters()}
    assert all(id(p) in unet_params for p in tiny_modules["afm_kv"].parameters())


def test_generation_unet_conv_in_takes_latent_plus_mask(tiny, tiny_modules):
    conv_in = tiny_modules["unet"].unet.conv_in
    assert conv_in.in_channels == tiny.latent_channels + 1 == 5
    assert tuple(conv_in.weight.shape[:2]) == (tiny.unet.block_out_channels[0], 5)
    assert tiny_modules["reference_unet"].unet.conv_in.in_channels == tiny.latent_channels


def configs_folder(root: Path, configs: dict[str, dict]) -> WeightsSource:
    """A weights folder of part configs with stub weight files: what the torch-free checks read."""
    from runtime.artifacts.weights import part_config_path, part_weights_path

    for part, config in configs.items():
        part_config_path(root, part).parent.mkdir(parents=True, exist_ok=True)
        part_config_path(root, part).write_text(json.dumps(config))
        part_weights_path(root, part).write_bytes(b"stub")
    write_weights_manifest(root, {"parts": {p: {"source": "test"} for p in configs}, "processing": {"layout": "reference"}})
    return WeightsSource(path=root)


SD_UNET = {"down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
           "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "block_out_channels": [32, 32, 64, 64],
           "attention_head_dim": 2, "cross_attention_dim": 64, "norm_num_groups": 8, "layers_per_block": 2}
CLIP_TEXT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 128,
             "hidden_act": "gelu"}


def test_manifest_reader_gives_the_processing_profiles_and_none_without_a_manifest(tmp_path):
    from runtime.artifacts.weights import read_weights_manifest

    configs_folder(tmp_path / "w", {"layout_head": {}})
    assert read_weights_manifest(tmp_path / "w")["processing"] == {"layout": "reference"}
    assert read_weights_manifest(tmp_path) is None


def test_preset_follows_the_folders_configs_and_keeps_the_canvas(tiny, tmp_path):
    from runtime.artifacts.architecture import resolve_preset

    weights = configs_folder(tmp_path, {"poster_unet": SD_UNET, "text_encoder": CLIP_TEXT})
    preset = resolve_preset("tiny", weights)
    assert preset.unet.cross_attention_dim == 64 and preset.unet.norm_num_groups == 8
    assert (preset.text.hidden_size, preset.text.hidden_act) == (64, "gelu")
    assert (preset.min_side, preset.max_side, preset.default_width) == (tiny.min_side, tiny.max_side, tiny.default_width)
    assert preset.name == "tiny" and preset.architecture.startswith("weights ")


@pytest.mark.parametrize("configs,message", [
    ({"poster_unet": SD_UNET, "text_encoder": CLIP_TEXT | {"hidden_size": 32}},
     "the text encoder is 32 wide but the U-Net's cross-attention reads 64"),
    ({"poster_unet": SD_UNET, "controlnet": SD_UNET | {"block_out_channels": [32, 64, 64, 64]}},
     "parts poster_unet and controlnet disagree on the U-Net sizes"),
    ({"poster_unet": SD_UNET | {"down_block_types": ["DownBlock2D"] * 4}}, "adgen's specs assume the SD 1.5 U-Net layout"),
    ({"poster_unet": SD_UNET | {"attention_head_dim": [5, 10, 20, 20]}}, "expected one integer attention_head_dim"),
], ids=["narrow text encoder", "two U-Net sizes", "not the SD layout", "per-block heads"])
def test_configs_that_do_not_fit_together_are_refused(tmp_path, configs, message):
    from runtime.artifacts.architecture import resolve_preset

    with pytest.raises(WeightsError, match=message):
        resolve_preset("tiny", configs_folder(tmp_path, configs))


def test_random_text_encoder_is_sized_to_what_the_trained_parts_read(tmp_path):
    from runtime.artifacts.architecture import resolve_preset

    weights = configs_folder(tmp_path, {"poster_unet": SD_UNET})
    assert resolve_preset("tiny", WeightsSource(path=tmp_path, allow_random=frozenset({"text_encoder"}))).text.hidden_size == 64
    assert weights.status(["poster_unet", "text_encoder"]) == {"poster_unet": "trained (test)",
                                                               "text_encoder": "random init (seed 0)"}


@pytest.mark.parametrize("path,allowed,message", [
    (True, {"vae", "nonsense"}, "expected parts of pipeline poster"),
    (True, {"poster_unet"}, "poster_unet is trained in"),
    (False, {"vae"}, "is for a weights folder with parts missing"),
], ids=["unknown part", "trained part", "no folder"])
def test_allow_random_that_means_nothing_is_refused(tmp_path, path, allowed, message):
    from runtime.errors import InputError

    configs_folder(tmp_path, {"poster_unet": SD_UNET})
    weights = WeightsSource(path=tmp_path if path else None, allow_random=frozenset(allowed))
    with pytest.raises(InputError, match=message) as excinfo:
        weights.check("poster", ("text_encoder", "vae", "poster_unet"))
    assert excinfo.value.field == "allow_random"
