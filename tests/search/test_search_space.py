"""Search space: switches map to the paper's features; the cost model counts passes per image by hand."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdi.errors import OptionError
from cdi.features import FEATURE_NAMES, GRAY_BOX_FEATURES
from cdi.search import SearchSpace, access_for, builtin_space, passes_per_image

SPACES = Path(__file__).resolve().parents[2] / "search" / "spaces"


@pytest.mark.parametrize(("features", "passes"), [
    # ML_t free beside GM_t; PIA's eps0 is SecMI's first call; NO: 8 forward+backward evaluations
    (FEATURE_NAMES, 5 + 12 + 3 - 1 + 10 * 3 + 16),
    (GRAY_BOX_FEATURES, 5 + 12 + 3 - 1 + 10),
    (("SecMI",), 12),
    (("SecMI", "PIA"), 12 + 2 - 1),
    (("PIAN",), 2),  # eps0 + one forward
    (("PIA", "PIAN"), 3),
    (("GM_0", "ML_0", "ML_100"), 3 + 1),
    (("NO_delta",), 16),
    ((), 0),
])
def test_passes_per_image_follow_the_family_definitions(features, passes):
    assert passes_per_image(features) == passes


def test_switches_select_families_and_timestep_groups_in_index_order():
    space = builtin_space("white")
    params = {"use_NO": True, "use_GM_high": True, "use_ML_low": True, "use_DL": False}
    assert space.features(params) == ("GM_700", "GM_800", "GM_900", "ML_0", "ML_100", "ML_200", "ML_300",
                                      "NO_loss", "NO_delta")
    assert space.features({}) == ()
    assert space.all_features == FEATURE_NAMES and space.access == "white"


def test_the_shipped_spaces_load_and_gray_needs_no_gradients():
    white = SearchSpace.from_yaml(SPACES / "white.yaml")
    gray = SearchSpace.from_yaml(SPACES / "gray.yaml")
    assert white.all_features == FEATURE_NAMES
    assert gray.all_features == GRAY_BOX_FEATURES and gray.access == "gray"
    assert gray.switches == builtin_space("gray").switches
    assert access_for(["DL", "ML_0"]) == "gray" and access_for(["GM_0"]) == "white"


def test_a_bare_NO_in_yaml_is_refused_with_a_hint(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("families: [DL, NO]\n")  # YAML 1.1 reads NO as false
    with pytest.raises(OptionError, match='quote "NO"'):
        SearchSpace.from_yaml(path)


def test_feature_settings_map_trials_to_variant_columns_and_cost():
    space = SearchSpace(families=("NO", "DL"), timestep_families=("GM",), settings={"no_evals": (4, 8, 16)})
    # The default value (8) is the plain column; others are extracted once for NO only.
    assert [(s, v) for s, v, _ in space.variants()] == [("no_evals", 4), ("no_evals", 16)]
    assert "NO_loss@no_evals=16" in space.all_columns and "DL@no_evals=16" not in space.all_columns
    params = {"use_NO": True, "use_DL": True, "no_evals": 16}
    assert space.columns(params) == ("DL", "NO_loss@no_evals=16", "NO_delta@no_evals=16")
    assert space.columns({**params, "no_evals": 8}) == ("DL", "NO_loss", "NO_delta")
    assert passes_per_image(space.features(params), space.feature_config(params)) == 5 + 2 * 16


@pytest.mark.parametrize("settings", [{"no_evals": [0]}, {"no_evals": [2.5]}, {"gm_mask_ratio": [1.0]},
                                      {"dl_draws": [3]}, {"no_evals": []}])
def test_invalid_feature_settings_are_refused_naming_the_setting(settings):
    with pytest.raises(OptionError) as caught:
        SearchSpace.from_dict({"feature_settings": settings}, name="bad")
    assert next(iter(settings)) in str(caught.value)


def test_the_calibrated_space_searches_the_calibration_of_gray_box_features():
    space = SearchSpace.from_yaml(SPACES / "calibrated.yaml")
    assert space.all_features == GRAY_BOX_FEATURES and space.access == "gray"
    assert space.calibration == {"representation": ("raw", "calibrated", "both"),
                                 "reference_formula": ("difference", "log_ratio"),
                                 "difficulty_calibration": ("off", "image", "image+pca", "image+pca+wiener")}
    assert space.uses_references() and space.uses_covariates()
    assert not SearchSpace.from_yaml(SPACES / "gray.yaml").calibration  # the other spaces score raw features


def test_a_bare_off_in_the_calibration_section_reads_as_off(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text("calibration:\n  difficulty_calibration: [off, image]\n")  # YAML 1.1 reads off as false
    assert SearchSpace.from_yaml(path).calibration == {"difficulty_calibration": ("off", "image")}


@pytest.mark.parametrize(("calibration", "named"), [({"representation": ["residual"]}, "representation"),
                                                    ({"difficulty_calibration": []}, "difficulty_calibration"),
                                                    ({"formula": ["difference"]}, "formula"),
                                                    (["raw"], "calibration")])
def test_invalid_calibration_sections_are_refused_naming_the_key(calibration, named):
    with pytest.raises(OptionError) as caught:
        SearchSpace.from_dict({"calibration": calibration}, name="bad")
    assert named in str(caught.value) and "\n" not in str(caught.value)
