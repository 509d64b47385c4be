"""The contract every feature family keeps, checked for every family on every kind of model adapter.

For each family of `cdi.features.FAMILIES`, each adapter kind that builds offline (pixel UNet, with and
without class labels; tiny Stable Diffusion, SDXL and DiT), and the family's whole feature list or a
wanted subset:
- it produces exactly the features it claims (`family.wanted`), each a finite (B,) float tensor;
- it reads only the settings it declares;
- the same seed gives the same bits; another seed gives other values where the family draws noise,
  the same bits where it draws none;
- an image's values do not depend on its batch companions: the image alone gives the same values
  within rtol 1e-4, atol 1e-6 (batched and single-image kernels round differently; the largest relative
  difference measured over these models is 7e-6, SecMI's, a small difference of two latents);
- its declared `passes()` are the denoiser calls it makes per image: forwards counted by a hook on the
  denoiser, backwards by a hook on the denoiser's input.
The plans of composite feature lists (shared eps0, ML_t from GM_t) cost what `passes_per_image` says.
Formula tests of each family stay in test_families.py.
"""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

import cdi.features.seeded_noise as noise_module
from cdi.features import (
    FAMILIES,
    FEATURE_NAMES,
    GRAY_BOX_FEATURES,
    FeatureBatch,
    FeatureConfig,
    passes_per_image,
    plan_families,
    plan_passes,
)
from cdi.models import load_model

from builders import save_pipeline, tiny_unet

B = 3
SEED = 7
LABELS = [1, 3, 0]
CAPTIONS = ["a cat", "a red dog", "blue"]
ADAPTER_KINDS = ("pixel", "pixel-class", "sd", "sdxl", "dit")


def _build(kind: str, root):
    if kind == "pixel":
        return save_pipeline(root / kind, tiny_unet())
    if kind == "pixel-class":
        return save_pipeline(root / kind, tiny_unet(num_class_embeds=4))
    if kind in ("sd", "sdxl"):
        pytest.importorskip("transformers")
    import latent_builders

    build = {"sd": latent_builders.save_sd_pipeline, "sdxl": latent_builders.save_sdxl_pipeline,
             "dit": latent_builders.save_dit_pipeline}[kind]
    return build(root / kind)


@pytest.fixture(scope="module", params=ADAPTER_KINDS)
def model(request, tmp_path_factory):
    """(adapter, z0 of B images, their labels and captions) for one adapter kind."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    adapter = load_model(_build(request.param, tmp_path_factory.mktemp("contract")))
    generator = torch.Generator().manual_seed(0)
    size, channels = adapter.info.image_size, adapter.info.image_channels
    images = torch.rand(B, channels, size, size, generator=generator) * 2 - 1
    with torch.no_grad():
        z0 = adapter.encode(images).float()
    yield adapter, z0
    torch.set_num_threads(before)


def _batch(adapter, z0: torch.Tensor, rows: list[int], seed: int = SEED) -> FeatureBatch:
    return FeatureBatch(z0=z0[rows], cond=adapter.condition([LABELS[i] for i in rows], [CAPTIONS[i] for i in rows]),
                        sha256=[f"{i + 1:064x}" for i in rows], seed=seed)


def _subsets(family_cls) -> list[tuple[str, ...] | None]:
    """The whole list (None), single own features (the first and the last), and a fused feature with its host."""
    own = family_cls.own_names()
    subsets = [None, (own[0],)] + ([(own[-1],)] if len(own) > 1 else [])
    subsets += [(host, fused) for fused, host in list(family_cls.fused.items())[-1:]]
    return subsets


CASES = [pytest.param(cls, subset, id=f"{cls.__name__}-{'all' if subset is None else '+'.join(subset)}")
         for cls in FAMILIES for subset in _subsets(cls)]


class _Reads:
    """A FeatureConfig that records which settings are read."""

    def __init__(self, config) -> None:
        self._config, self.read = config, set()

    def __getattr__(self, name: str):
        self.read.add(name)
        return getattr(self._config, name)


@contextlib.contextmanager
def _counting(adapter):
    """Denoiser forwards and backwards (through its input), in image rows."""
    calls = {"forward": 0, "backward": 0}

    def hook(module, args, kwargs, out):
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        calls["forward"] += sample.shape[0]
        if torch.is_grad_enabled() and sample.requires_grad:
            sample.register_hook(lambda grad: calls.__setitem__("backward", calls["backward"] + grad.shape[0]))

    handle = adapter.denoiser.register_forward_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


@contextlib.contextmanager
def _noise_draws(monkeypatch):
    """The (seed, sha256, feature, t, draw) keys of every seeded noise draw."""
    draws = []
    original = noise_module._seed_for

    def spy(*key):
        draws.append(key)
        return original(*key)

    monkeypatch.setattr(noise_module, "_seed_for", spy)
    yield draws
    monkeypatch.setattr(noise_module, "_seed_for", original)


def _run(family, adapter, batch) -> dict[str, torch.Tensor]:
    """As the extractor runs a family: gradient-free ones under inference mode."""
    mode = torch.inference_mode() if family.access == "gray" else contextlib.nullcontext()
    with mode:
        return {name: value.detach().clone() for name, value in family.compute(adapter, batch).values.items()}


@pytest.mark.parametrize("family_cls, subset", CASES)
def test_family_keeps_the_contract(model, family_cls, subset, monkeypatch):
    adapter, z0 = model
    rows = list(range(B))
    reads = _Reads(FeatureConfig())
    family = family_cls(reads, subset)
    expected_names = set(family_cls.names if subset is None else family_cls.claim(subset))
    assert family.wanted == expected_names and expected_names

    with _counting(adapter) as calls, _noise_draws(monkeypatch) as draws:
        values = _run(family, adapter, _batch(adapter, z0, rows))
    passes = family.passes()
    # Names, shape, finiteness.
    assert set(values) == expected_names
    for name, value in values.items():
        assert value.shape == (B,) and value.is_floating_point(), name
        assert torch.isfinite(value).all(), name
    # Declared settings only.
    declared = {s.name for s in family_cls.settings}
    assert reads.read <= declared, f"reads undeclared settings {sorted(reads.read - declared)}"
    # Declared passes: forwards (shared batch calls included, made once here) and backwards per image.
    assert (calls["forward"] / B, calls["backward"] / B) == (passes.forwards, passes.forward_backward)
    assert passes.total == passes.forwards + passes.forward_backward

    # Seeded: same seed, same bits; another seed changes the values exactly where noise is drawn.
    again = _run(family, adapter, _batch(adapter, z0, rows))
    assert all(torch.equal(again[n], values[n]) for n in values)
    other = _run(family, adapter, _batch(adapter, z0, rows, seed=SEED + 1))
    for name in values:
        if draws:
            assert (other[name] != values[name]).all(), f"{name} ignores the seed"
        else:
            assert torch.equal(other[name], values[name]), f"{name} draws no noise but depends on the seed"
    if draws:  # every draw is keyed by one image
        assert {key[1] for key in draws} == {f"{i + 1:064x}" for i in rows}

    # Batch-size independence: each image alone.
    for i in rows:
        alone = _run(family, adapter, _batch(adapter, z0, [i]))
        for name in values:
            torch.testing.assert_close(alone[name][0], values[name][i], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("names", [FEATURE_NAMES, GRAY_BOX_FEATURES, ("SecMI", "PIA"), ("SecMI", "PIAN", "ML_0"),
                                   ("GM_0", "ML_0", "ML_100"), ("ML_900",), ("DL", "NO_delta")],
                         ids=["white", "gray", "secmi-pia", "secmi-pian-ml", "gm-ml", "ml", "dl-no"])
def test_a_plan_costs_what_passes_per_image_says(model, names):
    """Families of one plan share the batch (eps0 once for SecMI and PIA; ML_t within GM_t's passes)."""
    adapter, z0 = model
    config = FeatureConfig()
    plan = plan_families(names, config)
    batch = _batch(adapter, z0, list(range(B)))
    produced = {}
    with _counting(adapter) as calls:
        for family in plan:
            produced.update(_run(family, adapter, batch))
    passes = plan_passes(plan)
    assert set(produced) == set(names)
    assert (calls["forward"] / B, calls["backward"] / B) == (passes.forwards, passes.forward_backward)
    assert passes_per_image(names, config) == passes.total


def test_the_declarations_add_up_to_the_feature_list_and_the_config():
    """FEATURE_NAMES: every family's own features in FAMILIES order, each defined once; the gray-box
    features those of the gray families; FeatureConfig's fields the declared settings, with their defaults."""
    own = [n for cls in FAMILIES for n in cls.own_names()]
    assert tuple(own) == FEATURE_NAMES and len(set(own)) == len(own)
    assert GRAY_BOX_FEATURES == tuple(n for cls in FAMILIES if cls.access == "gray" for n in cls.own_names())
    assert all(cls.access in ("gray", "white") for cls in FAMILIES)
    for cls in FAMILIES:  # a fused feature is another family's, produced beside one of this family's own
        for fused, host in cls.fused.items():
            assert fused in cls.names and fused in FEATURE_NAMES and fused not in cls.own_names()
            assert host in cls.own_names()
    declared = {}
    for cls in FAMILIES:
        for setting in cls.settings:
            assert declared.setdefault(setting.name, setting) is setting
            assert setting.check(setting.default) == setting.default
    fields = dataclasses.fields(FeatureConfig)
    assert [f.name for f in fields] == list(declared)
    assert [(f.default, f.type) for f in fields] == [(s.default, s.annotation) for s in declared.values()]
    assert FeatureConfig().to_dict() == {name: s.default for name, s in declared.items()}


def test_a_wanted_timestep_the_settings_do_not_compute_is_refused_naming_it():
    """GM_t / ML_t are computed at the `multi_timesteps` setting only: a wanted one outside it is an option
    error when the plan is made (before any model pass), not a missing column later."""
    from cdi.errors import OptionError
    from cdi.features.gradient_masking import MULTI_TIMESTEPS

    config = FeatureConfig(multi_timesteps=(50, *MULTI_TIMESTEPS[1:]))
    for names in (FEATURE_NAMES, ("ML_0",), ("GM_0", "ML_0")):
        with pytest.raises(OptionError, match=r"feature (GM|ML)_0: its timestep 0 is not in .*multi_timesteps"):
            plan_families(names, config)
    assert passes_per_image(("GM_100", "ML_100"), config) == 3
