"""Per-epoch metrics: a CSV rewritten atomically and TensorBoard event files (host side)."""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path

WALL_TIME_COLUMNS = ("plan_ms", "epoch_seconds")  # differ between otherwise identical runs


class MetricsLog:
    """Rows of per-epoch metrics kept in memory and mirrored to ``metrics.csv`` and TensorBoard."""

    def __init__(self, run_dir: Path, tensorboard: bool = True, name: str = "metrics.csv"):
        self.path = Path(run_dir) / name
        self.rows: list[dict] = []
        self._writer = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def load(self, up_to_epoch: int) -> None:
        """Keep the rows of epochs ``<= up_to_epoch`` from an existing CSV (used on resume)."""
        if not self.path.is_file():
            return
        with self.path.open() as f:
            self.rows = [row for row in csv.DictReader(f) if int(row["epoch"]) <= up_to_epoch]
        if self.rows:
            self._write()
        else:
            self.path.unlink()

    def append(self, row: dict) -> None:
        self.rows.append({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        self._write()
        if self._writer is not None:
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._writer.add_scalar(f"train/{key}", value, int(row["epoch"]))
            self._writer.flush()

    def _write(self) -> None:
        if not self.rows:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(self.rows[0]))
        writer.writeheader()
        writer.writerows(self.rows)
        tmp = self.path.with_suffix(".csv.tmp")
        tmp.write_text(buf.getvalue())
        os.replace(tmp, self.path)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
