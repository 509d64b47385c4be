"""Statistics: cross-fitted membership scores and the one-sided dataset-inference test.

Never imports torch: it works on feature arrays only.
"""

from __future__ import annotations

from cdi.stats.hypothesis import DatasetInferenceTest, TestResult, welch_one_sided
from cdi.stats.scoring import CrossFittedScorer

__all__ = ["CrossFittedScorer", "DatasetInferenceTest", "TestResult", "welch_one_sided"]
