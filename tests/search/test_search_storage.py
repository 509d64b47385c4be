"""Studies in a database: resumable, shared by worker processes; PostgreSQL against a real server."""

from __future__ import annotations

import os
import uuid

import optuna
import pytest

from cdi.errors import OptionError
from cdi.search import Objective, builtin_space, create_study, optimize
from cdi.search.study import open_storage


def _objective(synthetic):
    return Objective(synthetic(n_per_side=30), builtin_space("gray"), n=20, n_resamples=1)


def _run_two_workers(storage: str, study_name: str, synthetic) -> optuna.Study:
    study = create_study(study_name, storage, multi_objective=False, seed=0, n_trials=6)
    optimize(study, _objective(synthetic), n_trials=6, n_workers=2, storage=storage)
    return optuna.load_study(study_name=study_name, storage=open_storage(storage))


def test_two_worker_processes_on_one_sqlite_study_finish_all_trials(synthetic, tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = _run_two_workers(storage, "shared", synthetic)
    states = [t.state for t in study.trials]
    assert len(states) == 6
    assert all(s in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for s in states)


def test_a_stored_study_resumes_where_it_stopped(synthetic, tmp_path):
    storage = f"sqlite:///{tmp_path / 'resume.db'}"
    for _ in range(2):  # two separate calls, as two `cdi search` invocations would make
        study = create_study("resumed", storage, multi_objective=False, seed=0, n_trials=3)
        optimize(study, _objective(synthetic), n_trials=3)
    assert len(optuna.load_study(study_name="resumed", storage=storage).trials) == 6
    with pytest.raises(OptionError, match="--multi-objective"):
        create_study("resumed", storage, multi_objective=True, seed=0, n_trials=3)


def test_workers_without_a_storage_url_are_refused(synthetic):
    study = create_study("memory", None, multi_objective=False, seed=0, n_trials=2)
    with pytest.raises(OptionError, match="--n-workers 2: .*--storage sqlite:///"):
        optimize(study, _objective(synthetic), n_trials=2, n_workers=2, storage=None)
    with pytest.raises(OptionError, match="--storage"):
        open_storage("search.db")


def test_postgresql_storage_shared_by_two_workers(synthetic):
    url = os.environ.get("CDI_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("CDI_TEST_POSTGRES_URL is not set: no PostgreSQL server to test against (.ci/run starts one)")
    from sqlalchemy.engine import make_url

    try:
        make_url(url).get_dialect().import_dbapi()
    except ImportError as exc:
        pytest.skip(f"CDI_TEST_POSTGRES_URL is set but SQLAlchemy's PostgreSQL driver is missing ({exc}): "
                    "pip install 'psycopg[binary]'")
    name = f"cdi-test-{uuid.uuid4().hex[:8]}"
    try:
        study = _run_two_workers(url, name, synthetic)
        assert len(study.trials) == 6
        assert all(t.state != optuna.trial.TrialState.RUNNING for t in study.trials)
    finally:
        optuna.delete_study(study_name=name, storage=url)


@pytest.mark.parametrize("url", ["postgresql://auditor:hunter2-long-secret@127.0.0.1:1/optuna",
                                 "http://auditor:hunter2-long-secret@127.0.0.1:1/optuna"])
def test_a_storage_that_cannot_be_opened_is_named_without_its_password(url):
    with pytest.raises(OptionError) as refused:
        open_storage(url)
    message = str(refused.value)
    assert "hunter2-long-secret" not in message and "auditor:***@127.0.0.1" in message
