"""An MLflow run per training run (``run.trackers: [mlflow]``).

``mlflow.tracking_uri``: a tracking server (``http://host:5000``) or a database URI; by default
``sqlite:///<run.storage_path>/mlflow/mlflow.db`` with artifacts in ``<run.storage_path>/mlflow/
artifacts`` (MLflow's own file store is refused by MLflow 3), viewed with ``mlflow ui
--backend-store-uri sqlite:///runs/mlflow/mlflow.db``. The driver talks to MLflow through an
explicit ``MlflowClient`` (no global active run, safe from the watcher thread); a resumed run
(``--resume``, an elastic restart) continues the MLflow run tagged with its folder.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ..config import Config
from ..redaction import redact_text, redact_uri
from ..runtime.console import one_line, say
from . import RunIdentity, flat_params, missing_package

FOLDER = "mlflow"
# MLflow's limits per log_batch call.
PARAMS_PER_BATCH, METRICS_PER_BATCH = 100, 1000
MAX_PARAM_CHARS = 6000


def default_tracking_uri(identity: RunIdentity) -> tuple[str, str]:
    """``(tracking URI, artifact location)`` when ``mlflow.tracking_uri`` is not set."""
    folder = Path(identity.storage_root if identity.local else os.getcwd()) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}", (folder / "artifacts").as_uri()


class MlflowTracker:
    name = "mlflow"

    def __init__(self, cfg: Config, identity: RunIdentity):
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise missing_package("mlflow", "mlflow", "mlflow") from None
        # A server that is down must fail the run's start in seconds, not after minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        # MLflow prints the run's link with the tracking URI as given, credentials and all:
        # vcl-dist prints it itself, masked (finish).
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        uri, artifacts = (cfg.mlflow.tracking_uri, None) if cfg.mlflow.tracking_uri else default_tracking_uri(identity)
        self.client = MlflowClient(uri)
        self.uri = uri
        experiment_name = identity.group or cfg.mlflow.experiment
        try:
            experiment = self.client.get_experiment_by_name(experiment_name)
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
                experiment_name, artifact_location=artifacts)
            tags = identity.tags()
            found = self.client.search_runs(
                [experiment_id], filter_string=f"tags.`vcl_dist.run_path` = '{_quoted(identity.run_uri)}'",
                max_results=1) if identity.resumed else []
            run = found[0] if found else self.client.create_run(experiment_id, run_name=identity.name, tags=tags)
            self.run_id, self.experiment_id = run.info.run_id, experiment_id
            if found:
                self.client.update_run(self.run_id, status="RUNNING")
            # Parameters are write-once in MLflow: a resumed run adds the keys it lacks and
            # records changed values (say, a longer train.epochs) as tags.
            logged = dict(run.data.params) if found else {}
            params = flat_params(cfg)
            for key, value in params.items():
                if key in logged and logged[key] != value[:MAX_PARAM_CHARS]:
                    self.client.set_tag(self.run_id, f"vcl_dist.resumed_with.{key}", value[:MAX_PARAM_CHARS])
            fresh = [Param(key, value[:MAX_PARAM_CHARS]) for key, value in params.items() if key not in logged]
            for start in range(0, len(fresh), PARAMS_PER_BATCH):
                self.client.log_batch(self.run_id, params=fresh[start:start + PARAMS_PER_BATCH])
        except Exception as err:  # noqa: BLE001 - any client error becomes one line before training starts
            raise ValueError(f"mlflow.tracking_uri={redact_uri(uri)}: cannot start an MLflow run: "
                             f"{redact_text(one_line(err))[:300]}") from None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        entries = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        for start in range(0, len(entries), METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=entries[start:start + METRICS_PER_BATCH])

    def flush(self) -> None:
        pass  # every call above is one request

    def log_artifacts(self, local_folder: str, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, local_folder, artifact_path)

    def finish(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")
        if self.uri.startswith(("http://", "https://")):
            link = f"{redact_uri(self.uri.rstrip('/'))}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
            say(f"MLflow run at {link}")


def _quoted(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def find_run(cfg: Config, run_uri: str):
    """``(client, run id)`` of the MLflow run of the training run at ``run_uri``, or None (a
    model trained without MLflow, or a tracking store out of reach)."""
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        return None
    uri = cfg.mlflow.tracking_uri
    if not uri:
        local = "://" not in run_uri
        folder = Path(run_uri).parent / FOLDER if local else Path.cwd() / FOLDER
        if not (folder / "mlflow.db").exists():
            return None
        uri = f"sqlite:///{folder / 'mlflow.db'}"
    try:
        client = MlflowClient(uri)
        runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                  filter_string=f"tags.`vcl_dist.run_path` = '{_quoted(run_uri)}'", max_results=1)
    except Exception:  # noqa: BLE001 - the report is written either way
        return None
    return (client, runs[0].info.run_id) if runs else None


def log_report(cfg: Config, folder: str, artifact_path: str) -> str | None:
    """Add an evaluation report to the MLflow run of the model's training run (when it was
    tracked with MLflow); returns the run id, or None."""
    if "mlflow" not in cfg.run.trackers or not cfg.run.name:
        return None
    found = find_run(cfg, f"{cfg.run.storage_path.rstrip('/')}/{cfg.run.name}")
    if found is None:
        return None
    client, run_id = found
    try:
        client.log_artifacts(run_id, folder, artifact_path)
    except Exception as err:  # noqa: BLE001 - the report is on disk either way
        from ..runtime.console import warn

        warn(f"the report was not added to MLflow run {run_id}: {redact_text(str(err))}")
        return None
    return run_id
