"""The `audit` API: cache reuse across audits and the record it leaves in MLflow."""

from __future__ import annotations

import mlflow
import pytest

from cdi.audit import audit
from cdi.features import ExtractionOptions


def test_second_audit_of_the_same_sets_reuses_every_feature(tiny_model, image_sets, tracking_uri, tmp_path):
    cached = ExtractionOptions(cache_dir=tmp_path, progress=False)
    first = audit(tiny_model, *image_sets, access="gray", extraction=cached, experiment="cache")
    second = audit(tiny_model, *image_sets, access="gray", extraction=cached, experiment="cache")
    client = mlflow.MlflowClient(tracking_uri)
    m1 = client.get_run(first.run_id).data.metrics
    m2 = client.get_run(second.run_id).data.metrics
    assert (m1["extraction.cache_hits"], m1["extraction.cache_misses"]) == (0, 24)
    assert (m2["extraction.cache_hits"], m2["extraction.cache_misses"]) == (24, 0)
    assert second.p_value == first.p_value  # same features, same folds: the same p-value
    assert {f"extraction.seconds.{f}" for f in ("DenoisingLoss", "SecMI", "PIA", "MultipleLoss")} <= set(m1)


def test_unreachable_tracking_server_fails_before_any_model_pass(tiny_model, image_sets, tmp_path, engine_passes):
    from cdi.errors import TrackingError

    with pytest.raises(TrackingError, match="--tracking-uri http://127.0.0.1:9"):
        audit(tiny_model, *image_sets, tracking_uri="http://127.0.0.1:9",
              extraction=ExtractionOptions(progress=False, cache_dir=tmp_path))  # a fresh cache: every image missing
    assert engine_passes == []
