"""Membership-inference features: one module per signal family, a registry and the extractor."""

from __future__ import annotations

from cdi.features.base import FeatureBatch, FeatureFamily, FeatureOutput, Passes, Setting
from cdi.features.extraction import ExtractionOptions, ExtractionReport, FeatureExtractor, extract, extract_models
from cdi.features.registry import (
    FAMILIES,
    FEATURE_NAMES,
    GRAY_BOX_FEATURES,
    FeatureConfig,
    features_for_access,
    features_reading,
    passes_per_image,
    plan_families,
    plan_passes,
    resolve_features,
)

__all__ = [
    "FAMILIES",
    "FEATURE_NAMES",
    "GRAY_BOX_FEATURES",
    "FeatureBatch",
    "FeatureConfig",
    "ExtractionOptions",
    "ExtractionReport",
    "FeatureExtractor",
    "FeatureFamily",
    "FeatureOutput",
    "Passes",
    "Setting",
    "extract",
    "extract_models",
    "features_for_access",
    "features_reading",
    "passes_per_image",
    "plan_families",
    "plan_passes",
    "resolve_features",
]
