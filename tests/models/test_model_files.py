"""Damaged model files are refused, never audited (`cdi.models.loading`).

Every test builds a tiny pipeline offline, damages one file the way a bad download, a partial copy or
a hand-edited config does, and asserts a ModelError (CLI: exit code 2, one stderr line) that names the
file. Missing weights above all: diffusers and transformers fill them with random values or leave
them uninitialised, so such a model would give another answer on every run under one fingerprint.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from cdi.cli import main
from cdi.errors import ModelError
from cdi.models import load_model
from cdi.models.loading import MAX_IMAGE_SIZE

from builders import save_pipeline, tiny_unet
from latent_builders import save_dit_pipeline, save_sd_pipeline, save_sdxl_pipeline

BUILDERS = {
    "pixel": lambda path: save_pipeline(path, tiny_unet()),
    "sd": save_sd_pipeline,
    "sdxl": save_sdxl_pipeline,
    "dit": save_dit_pipeline,
}
#: The denoiser class of each pipeline, whose from_pretrained must not run for an absurd config.
DENOISERS = {"pixel": ("unet", "UNet2DModel"), "sd": ("unet", "UNet2DConditionModel"),
             "dit": ("transformer", "DiTTransformer2DModel")}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pristine")
    return {kind: build(root / kind) for kind, build in BUILDERS.items()}


@pytest.fixture
def copy_of(pristine, tmp_path):
    def copy(kind: str) -> Path:
        return Path(shutil.copytree(pristine[kind], tmp_path / kind))
    return copy


def weights_of(model: Path, component: str) -> Path:
    (weights,) = sorted((model / component).glob("*.safetensors"))
    return weights


def metadata_of(path: Path) -> dict[str, str] | None:
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


def drop_tensors(path: Path, count: int = 2) -> list[str]:
    """Rewrite a safetensors file without `count` of its tensors (spread over the file); their names."""
    tensors, metadata = load_file(path), metadata_of(path)
    names = sorted(tensors)
    dropped = [names[i * len(names) // count] for i in range(count)]
    for name in dropped:
        del tensors[name]
    save_file(tensors, path, metadata=metadata)
    return dropped


def reshape_tensor(path: Path) -> str:
    """Give one tensor of the file another shape (one more axis); its name."""
    tensors, metadata = load_file(path), metadata_of(path)
    name = sorted(tensors)[0]
    tensors[name] = torch.zeros(*tensors[name].shape, 2)
    save_file(tensors, path, metadata=metadata)
    return name


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garbage(path: Path) -> None:
    size = path.stat().st_size
    path.write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())


def edit_json(path: Path, **fields) -> None:
    content = json.loads(path.read_text())
    content.update(fields)
    path.write_text(json.dumps(content))


def refusal(model: Path) -> str:
    with pytest.raises(ModelError) as caught:
        load_model(model)
    message = str(caught.value)
    assert "\n" not in message
    return message


def assert_same_weights(module: torch.nn.Module, reference: torch.nn.Module) -> None:
    expected = reference.state_dict()
    state = module.state_dict()
    assert state.keys() == expected.keys()
    for name, tensor in state.items():
        assert torch.equal(tensor, expected[name]), name


# -- missing, extra and misshapen tensors ------------------------------------------------------------


@pytest.mark.parametrize("kind, component", [
    ("pixel", "unet"), ("sd", "unet"), ("sd", "vae"), ("sd", "text_encoder"), ("sdxl", "unet"),
    ("sdxl", "text_encoder"), ("sdxl", "text_encoder_2"), ("dit", "transformer"), ("dit", "vae"),
])
def test_missing_tensors_are_refused_naming_the_file_and_the_tensors(copy_of, kind, component):
    model = copy_of(kind)
    weights = weights_of(model, component)
    dropped = drop_tensors(weights)
    message = refusal(model)
    assert f"{weights}: lacks 2 of the " in message, message
    for name in dropped:
        assert name in message, (name, message)
    assert "re-save" in message


def test_many_missing_tensors_are_counted_not_all_listed(copy_of):
    model = copy_of("pixel")
    weights = weights_of(model, "unet")
    dropped = drop_tensors(weights, count=12)
    message = refusal(model)
    assert "lacks 12 of the" in message and "(7 more)" in message
    assert sum(name in message for name in dropped) == 5


def test_missing_tensors_of_pickle_weights_are_refused_too(tmp_path):
    model = save_pipeline(tmp_path / "pickled", tiny_unet(), safe=False)
    (weights,) = (model / "unet").glob("*.bin")
    state = torch.load(weights, weights_only=True)
    del state["conv_in.weight"]
    torch.save(state, weights)
    with pytest.raises(ModelError, match=r"diffusion_pytorch_model\.bin: lacks 1 of the .*conv_in\.weight"):
        load_model(model, allow_pickle=True)


@pytest.mark.parametrize("kind, component", [
    ("pixel", "unet"), ("sd", "vae"), ("sd", "text_encoder"), ("dit", "transformer"),
])
def test_a_tensor_of_the_wrong_shape_is_refused(copy_of, kind, component):
    model = copy_of(kind)
    weights = weights_of(model, component)
    name = reshape_tensor(weights)
    message = refusal(model)
    assert str(weights) in message and name in message and "shape" in message, message


def test_extra_tensors_are_ignored_with_a_warning(copy_of, pristine, caplog):
    model = copy_of("pixel")
    weights = weights_of(model, "unet")
    tensors = load_file(weights)
    tensors["leftover.from_training"] = torch.ones(3)
    save_file(tensors, weights, metadata=metadata_of(weights))
    with caplog.at_level(logging.WARNING, logger="cdi.models.loading"):
        adapter = load_model(model)
    assert any(str(weights) in record.getMessage() and "leftover.from_training" in record.getMessage()
               for record in caplog.records), caplog.text
    assert_same_weights(adapter.unet, load_model(pristine["pixel"]).unet)


# -- damaged safetensors files -------------------------------------------------------------------------


@pytest.mark.parametrize("damage", [truncate, garbage], ids=["truncated", "garbage"])
@pytest.mark.parametrize("kind, component", [
    ("pixel", "unet"), ("sd", "unet"), ("sd", "text_encoder"), ("sdxl", "text_encoder_2"), ("dit", "vae"),
])
def test_truncated_or_garbage_weights_are_refused_naming_the_file(copy_of, kind, component, damage):
    model = copy_of(kind)
    weights = weights_of(model, component)
    damage(weights)
    message = refusal(model)
    assert message.startswith(f"{weights}: not a readable safetensors file"), message


# -- sharded checkpoints -------------------------------------------------------------------------------


def reshard(model: Path, component: str) -> Path:
    """Re-save a component as several shards with an index, as large checkpoints are published; the index."""
    from diffusers import UNet2DModel
    from transformers import CLIPTextModel

    cls = UNet2DModel if component == "unet" else CLIPTextModel
    folder = model / component
    module = cls.from_pretrained(folder)
    weights_of(model, component).unlink()
    module.save_pretrained(folder, max_shard_size="10KB", safe_serialization=True)
    (index,) = folder.glob("*.safetensors.index.json")
    assert len(list(folder.glob("*.safetensors"))) > 2
    return index


SHARDED = [("pixel", "unet"), ("sd", "text_encoder")]


@pytest.mark.parametrize("kind, component", SHARDED)
def test_a_sharded_checkpoint_loads_like_the_single_file(copy_of, pristine, kind, component):
    model = copy_of(kind)
    reshard(model, component)
    sharded, single = load_model(model), load_model(pristine[kind])
    if component == "unet":
        assert_same_weights(sharded.unet, single.unet)
    else:
        assert_same_weights(sharded.text_encoders[0], single.text_encoders[0])


@pytest.mark.parametrize("kind, component", SHARDED)
def test_tensors_missing_from_a_sharded_checkpoint_are_refused_naming_the_index(copy_of, kind, component):
    model = copy_of(kind)
    index = reshard(model, component)
    content = json.loads(index.read_text())
    shard = index.parent / sorted(set(content["weight_map"].values()))[1]
    dropped = drop_tensors(shard)
    for name in dropped:  # as if the index had been written for the incomplete shards
        del content["weight_map"][name]
    index.write_text(json.dumps(content))
    message = refusal(model)
    assert f"{index}: lacks 2 of the " in message and all(name in message for name in dropped), message


@pytest.mark.parametrize("kind, component", SHARDED)
def test_a_shard_without_the_tensors_its_index_lists_is_refused(copy_of, kind, component):
    model = copy_of(kind)
    index = reshard(model, component)
    shard = index.parent / sorted(set(json.loads(index.read_text())["weight_map"].values()))[1]
    dropped = drop_tensors(shard, count=1)
    message = refusal(model)
    assert message.startswith(f"{shard}: lacks 1 tensor(s) its index") and dropped[0] in message, message


@pytest.mark.parametrize("kind, component", SHARDED)
def test_a_missing_or_truncated_shard_is_refused(copy_of, kind, component):
    model = copy_of(kind)
    index = reshard(model, component)
    first, second = sorted(set(json.loads(index.read_text())["weight_map"].values()))[:2]
    truncate(index.parent / first)
    assert refusal(model).startswith(f"{index.parent / first}: not a readable safetensors file")
    (index.parent / first).unlink()
    message = refusal(model)
    assert message.startswith(f"{index}: shard '{first}' is missing"), message
    assert second not in message


# -- config.json ---------------------------------------------------------------------------------------


@pytest.fixture
def never_built(monkeypatch):
    """Fail the test if a denoiser is loaded: an absurd config must be refused before that."""
    import diffusers

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained ran on a config that should have been refused first")

    def install(kind: str) -> None:
        monkeypatch.setattr(getattr(diffusers, DENOISERS[kind][1]), "from_pretrained", refuse)
    return install


BROKEN_CONFIGS = {
    "not-json": ("{ this is not json", "not readable JSON"),
    "a-list": ([1, 2, 3], "holds a JSON list, not an object"),
    "sample-size-text": ({"sample_size": "abc"}, "sample_size 'abc' is not a positive integer"),
    "sample-size-huge": ({"sample_size": 100000}, "sample_size 100000 is outside 1.."),
    "sample-size-zero": ({"sample_size": 0}, "sample_size 0 is outside 1.."),
    "sample-size-negative": ({"sample_size": -8}, "sample_size -8 is outside 1.."),
    "sample-size-missing": ({"sample_size": None}, "sample_size None is not a positive integer"),
    "channels-text": ({"in_channels": "three"}, "in_channels 'three' is not a positive integer"),
    "channels-fractional": ({"in_channels": 3.5}, "in_channels 3.5 is not a positive integer"),
}
#: UNet configs only (DiT has no block_out_channels).
BROKEN_UNET_CONFIGS = {
    "blocks-negative": ({"block_out_channels": [8, -16]}, "block_out_channels [8, -16] is not a positive integer"),
    "blocks-not-divisible-by-groups": ({"block_out_channels": [8, 18]}, "does not describe a valid"),
    "blocks-fewer-than-block-types": ({"block_out_channels": [8]}, "does not describe a valid"),
    "blocks-absurd": ({"block_out_channels": [4096, 1 << 20]}, "parameters, more than the"),
}


def write_config(path: Path, broken) -> None:
    if isinstance(broken, str):
        path.write_text(broken)
    elif isinstance(broken, list):
        path.write_text(json.dumps(broken))
    else:
        edit_json(path, **broken)


@pytest.mark.parametrize("kind, broken, expected", [
    *[pytest.param(kind, *BROKEN_CONFIGS[case], id=f"{kind}-{case}") for kind in DENOISERS for case in BROKEN_CONFIGS],
    *[pytest.param(kind, *BROKEN_UNET_CONFIGS[case], id=f"{kind}-{case}") for kind in ("pixel", "sd")
      for case in BROKEN_UNET_CONFIGS],
])
def test_a_broken_denoiser_config_is_refused_before_loading(copy_of, never_built, kind, broken, expected):
    model = copy_of(kind)
    config = model / DENOISERS[kind][0] / "config.json"
    write_config(config, broken)
    never_built(kind)
    message = refusal(model)
    assert message.startswith(f"{config}: ") and expected in message, message


@pytest.mark.parametrize("kind, limit", [("pixel", MAX_IMAGE_SIZE), ("sd", MAX_IMAGE_SIZE // 2),
                                         ("dit", MAX_IMAGE_SIZE // 2)])
def test_sample_size_limit_is_the_image_size_limit(copy_of, never_built, kind, limit):
    """4096 pixels a side; for latent models the tiny VAE's 2x downsampling makes that 2048 latent positions."""
    model = copy_of(kind)
    config = model / DENOISERS[kind][0] / "config.json"
    edit_json(config, sample_size=limit + 1)
    never_built(kind)
    assert f"outside 1..{limit} " in refusal(model)


def test_a_broken_vae_config_is_refused(copy_of):
    model = copy_of("sd")
    config = model / "vae" / "config.json"
    edit_json(config, scaling_factor="0.18")
    assert refusal(model).startswith(f"{config}: scaling_factor '0.18' is not a positive finite number")
    write_config(config, "garbage")
    assert refusal(model).startswith(f"{config}: not readable JSON")


def test_a_broken_text_encoder_config_is_refused(copy_of):
    model = copy_of("sd")
    config = model / "text_encoder" / "config.json"
    edit_json(config, hidden_size=1 << 20, vocab_size=1 << 20)
    assert refusal(model).startswith(f"{config}: describes CLIPTextModel with ")
    edit_json(config, hidden_size=16.5)
    assert refusal(model).startswith(f"{config}: hidden_size 16.5 is not a positive integer")


# -- scheduler_config.json and model_index.json --------------------------------------------------------


@pytest.mark.parametrize("broken, expected", [
    ("not json at all", "not readable JSON"),
    ([0.0001, 0.02], "holds a JSON list, not an object"),
    ({"num_train_timesteps": "abc"}, "num_train_timesteps 'abc' is not an integer in 1..100000"),
    ({"num_train_timesteps": 10 ** 12}, "num_train_timesteps 1000000000000 is not an integer"),
    ({"num_train_timesteps": 0}, "num_train_timesteps 0 is not an integer"),
    ({"beta_end": 5.0}, "no valid noise schedule"),
    ({"beta_start": "small"}, "not a valid DDPMScheduler config"),
    ({"beta_schedule": "exotic"}, "not a valid DDPMScheduler config"),
    ({"trained_betas": "0.1"}, "trained_betas is not a list"),
    ({"_class_name": "UNet2DModel"}, "unknown scheduler class 'UNet2DModel'"),
], ids=["not-json", "a-list", "steps-text", "steps-huge", "steps-zero", "betas-above-one", "beta-text",
        "schedule-unknown", "trained-betas-text", "not-a-scheduler"])
def test_a_broken_scheduler_config_is_refused(copy_of, broken, expected):
    model = copy_of("pixel")
    config = model / "scheduler" / "scheduler_config.json"
    write_config(config, broken)
    message = refusal(model)
    assert message.startswith(f"{config}: ") and expected in message, message


@pytest.mark.parametrize("content, expected", [
    ('["DDPMPipeline"]', "holds a JSON list, not an object"),
    ("{'_class_name': 'DDPMPipeline'}", "not readable JSON"),
    ('{"_class_name": 3}', "no pipeline class name"),
])
def test_a_model_index_that_is_not_an_object_is_refused(copy_of, content, expected):
    model = copy_of("pixel")
    (model / "model_index.json").write_text(content)
    message = refusal(model)
    assert message.startswith(f"{model / 'model_index.json'}: ") and expected in message, message


# -- through the CLI: exit code 2, one line ------------------------------------------------------------


def damage_weights(damage):
    def apply(model: Path, component: str) -> Path:
        weights = weights_of(model, component)
        damage(weights)
        return weights
    return apply


def damage_config(file: str, broken):
    def apply(model: Path, component: str) -> Path:
        path = model / component / file if component else model / file
        write_config(path, broken)
        return path
    return apply


CLI_CASES = {
    "pixel-missing-tensors": ("pixel", "unet", damage_weights(drop_tensors)),
    "sd-missing-unet-tensors": ("sd", "unet", damage_weights(drop_tensors)),
    "sd-missing-vae-tensors": ("sd", "vae", damage_weights(drop_tensors)),
    "sd-missing-text-encoder-tensors": ("sd", "text_encoder", damage_weights(drop_tensors)),
    "dit-missing-tensors": ("dit", "transformer", damage_weights(drop_tensors)),
    "sdxl-truncated-text-encoder-2": ("sdxl", "text_encoder_2", damage_weights(truncate)),
    "sd-wrong-shape-text-encoder": ("sd", "text_encoder", damage_weights(reshape_tensor)),
    "pixel-garbage-weights": ("pixel", "unet", damage_weights(garbage)),
    "pixel-sample-size-text": ("pixel", "unet", damage_config("config.json", {"sample_size": "abc"})),
    "dit-sample-size-huge": ("dit", "transformer", damage_config("config.json", {"sample_size": 100000})),
    "sd-config-not-json": ("sd", "unet", damage_config("config.json", "{")),
    "pixel-scheduler-garbage": ("pixel", "scheduler", damage_config("scheduler_config.json", "\x00\x01")),
    "pixel-model-index-list": ("pixel", "", damage_config("model_index.json", ["DDPMPipeline"])),
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_refuses_a_damaged_model_on_one_line_with_exit_code_2(
    case, copy_of, image_sets, tracking_uri, tmp_path, capsys
):
    kind, component, damage = CLI_CASES[case]
    model = copy_of(kind)
    named = damage(model, component)
    argv = ["audit", "--model", str(model), "--suspect", str(image_sets[0]), "--control", str(image_sets[1]),
            "--no-progress", "--tracking-uri", tracking_uri, "--experiment", f"model-files-{uuid.uuid4().hex[:8]}",
            "--access", "gray", "--features", "DL", "--permutations", "100", "--power-resamples", "0"]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 2, (code, captured.out, captured.err)
    assert "Traceback" not in captured.out + captured.err
    lines = captured.err.strip("\n").splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"cdi: error: {named}: "), lines[0]
