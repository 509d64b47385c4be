"""Multi-step workflows of a data owner, each step an MLflow run under one parent run, finished steps reused.

- `pipelines.owner_audit`: calibrate on a reference model with known membership -> search -> audit -> report;
- `pipelines.demo_chain`: train the demo target -> audit it;
- `pipelines.steps`: the step machinery both share (reuse keys, the parent run, the input digests).

Entry points: `pipelines/MLproject` (`mlflow run pipelines -e owner_audit`), or `python -m pipelines.owner_audit`.
"""
