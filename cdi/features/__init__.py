"""Membership-inference features: one module per signal family, a registry and the extractor."""

from __future__ import annotations

from cdi.features.base import (
    FEATURE_NAMES,
    GRAY_BOX_FEATURES,
    FeatureBatch,
    FeatureConfig,
    FeatureFamily,
    FeatureOutput,
)
from cdi.features.extraction import ExtractionReport, FeatureExtractor, extract, extract_features
from cdi.features.registry import FAMILIES, features_for_access, plan_families, resolve_features

__all__ = [
    "FAMILIES",
    "FEATURE_NAMES",
    "GRAY_BOX_FEATURES",
    "FeatureBatch",
    "FeatureConfig",
    "ExtractionReport",
    "FeatureExtractor",
    "FeatureFamily",
    "FeatureOutput",
    "extract",
    "extract_features",
    "features_for_access",
    "plan_families",
    "resolve_features",
]
