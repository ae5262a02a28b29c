"""TensorBoard event files in ``<run>/tensorboard`` (``tensorboard --logdir runs``).

Written straight into a local run folder; for a run in object storage, into a local staging
folder that is copied to ``<run>/tensorboard`` at every epoch and at the end (event files are
append-only: each copy replaces the previous one whole).
"""

from __future__ import annotations

import shutil
import tempfile

from ..config import Config, dump_config
from . import RunIdentity, missing_package

FOLDER = "tensorboard"


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, cfg: Config, identity: RunIdentity):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise missing_package("tensorboard", "tensorboard", "tensorboard") from None
        self.identity = identity
        self.target = f"{identity.run_root}/{FOLDER}"
        self.staging = None if identity.local else tempfile.mkdtemp(prefix="vcl-dist-tensorboard-")
        self.writer = SummaryWriter(self.target if identity.local else self.staging)
        # Markdown: indented by four spaces, the YAML shows as a code block in the Text tab.
        self.writer.add_text("config", "    " + dump_config(cfg).replace("\n", "\n    "), 0)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def flush(self) -> None:
        self.writer.flush()
        if self.staging is not None:
            import pyarrow.fs as pafs

            pafs.copy_files(self.staging, self.target, source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.identity.storage)

    def log_artifacts(self, local_folder: str, artifact_path: str) -> None:
        pass  # the run folder holds the model and reports already

    def finish(self, failed: bool) -> None:
        self.flush()
        self.writer.close()
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
