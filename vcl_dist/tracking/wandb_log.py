"""A Weights & Biases run per training run (``run.trackers: [wandb]``).

``wandb.mode: auto`` logs online when ``WANDB_API_KEY`` is set and offline otherwise: the run
is written to ``<run>/wandb/offline-run-…`` (a local run folder; ``./wandb`` on the driver for
a run in object storage) for ``wandb sync`` later — no network needed. The W&B run id is derived
from the run folder, so a resumed run continues the same W&B run; a Tune search's trials share
its name as their W&B group.
"""

from __future__ import annotations

import hashlib
import os

from ..config import Config, config_record
from ..runtime.console import one_line
from . import RunIdentity, missing_package


def wandb_run_id(identity: RunIdentity) -> str:
    digest = hashlib.sha256(identity.run_uri.encode()).hexdigest()[:8]
    safe = "".join(c if c.isalnum() or c in "-_" else "-" for c in identity.name)[:55]
    return f"{safe}-{digest}"


class WandbTracker:
    name = "wandb"

    def __init__(self, cfg: Config, identity: RunIdentity):
        try:
            import wandb
        except ImportError:
            raise missing_package("wandb", "wandb", "wandb") from None
        mode = cfg.wandb.mode
        if mode == "auto":
            mode = "online" if os.environ.get("WANDB_API_KEY") else "offline"
        folder = identity.run_root if identity.local else os.getcwd()
        os.makedirs(folder, exist_ok=True)
        try:
            self.run = wandb.init(
                project=cfg.wandb.project, entity=cfg.wandb.entity, name=identity.name, id=wandb_run_id(identity),
                resume="allow", dir=folder, mode=mode, group=identity.group, config=config_record(cfg),
                tags=["vcl-dist"], notes=identity.run_uri,
                # console="off": the driver's output stays the driver's (no wrapped stdout);
                # no system metrics sampler beside a training driver that mostly waits.
                # x_disable_meta: W&B's metadata holds the command line as typed (credentials
                # inside a URI and all); the run's config, masked, says what it ran with.
                settings=wandb.Settings(console="off", silent=True, x_disable_stats=True, disable_git=True,
                                        save_code=False, init_timeout=120, x_disable_meta=True),
            )
        except Exception as err:  # noqa: BLE001 - one line before training starts
            raise ValueError(f"wandb: cannot start a run ({mode}): {one_line(err, 300)}") from None
        for key, value in identity.tags().items():
            self.run.summary[key] = value

    @property
    def folder(self) -> str:
        return self.run.dir.rsplit("/files", 1)[0]

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(dict(metrics), step=step)

    def flush(self) -> None:
        pass

    def log_artifacts(self, local_folder: str, artifact_path: str) -> None:
        pass  # model artifacts go to MLflow and the run folder; W&B keeps the metrics

    def finish(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)
