"""metrics.jsonl (one JSON object per logged step) and TensorBoard event files, on process 0 only."""

from __future__ import annotations

import json

from etils import epath


class MetricsLog:
  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._file = self._writer = None
    if enabled:
      self._file = (epath.Path(workdir) / "metrics.jsonl").open("a")  # local or gs://
      try:
        from tensorboardX import SummaryWriter
        self._writer = SummaryWriter(str(epath.Path(workdir) / "tensorboard"))
      except ImportError:  # TensorBoard files are a convenience; metrics.jsonl is the contract
        self._writer = None

  def write(self, row: dict) -> None:
    if not self.enabled:
      return
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._writer is not None:
      for key, value in row.items():
        if key != "step" and isinstance(value, (int, float)):
          self._writer.add_scalar(key, value, row["step"])

  def close(self) -> None:
    if self._file:
      self._file.close()
    if self._writer is not None:
      self._writer.close()


def read_metrics(workdir: str) -> list[dict]:
  with (epath.Path(workdir) / "metrics.jsonl").open() as f:
    return [json.loads(line) for line in f if line.strip()]
