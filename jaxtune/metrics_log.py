"""metrics.jsonl (one JSON object per logged step) and TensorBoard event files, on process 0 only."""

from __future__ import annotations

import json
import time

from etils import epath


class MetricsLog:
  """Appends rows to WORKDIR/metrics.jsonl. An object store (gs://) cannot append: there the file is
  rewritten whole, at most every `upload_every` seconds and at every `flush()` / `close()` (the
  trainer flushes before each checkpoint, so a killed run never loses rows the checkpoint covers)."""

  def __init__(self, workdir: str, enabled: bool = True, upload_every: float = 10.0):
    self.enabled, self.upload_every = enabled, upload_every
    self._file = self._writer = None
    self._path = epath.Path(workdir) / "metrics.jsonl"
    self._remote = "://" in str(workdir)
    self._text, self._uploaded, self._pending = "", 0.0, False
    if enabled:
      if self._remote:
        self._text = self._path.read_text() if self._path.exists() else ""
      else:
        self._file = self._path.open("a")
      try:
        from tensorboardX import SummaryWriter
        self._writer = SummaryWriter(str(epath.Path(workdir) / "tensorboard"))
      except ImportError:  # TensorBoard files are a convenience; metrics.jsonl is the contract
        self._writer = None

  def write(self, row: dict) -> None:
    if not self.enabled:
      return
    line = json.dumps(row) + "\n"
    if self._remote:
      self._text, self._pending = self._text + line, True
      if time.monotonic() - self._uploaded >= self.upload_every:
        self.flush()
    else:
      self._file.write(line)
      self._file.flush()
    if self._writer is not None:
      for key, value in row.items():
        if key != "step" and isinstance(value, (int, float)):
          self._writer.add_scalar(key, value, row["step"])

  def flush(self) -> None:
    if self._pending:
      self._path.write_text(self._text)
      self._uploaded, self._pending = time.monotonic(), False

  def close(self) -> None:
    self.flush()
    if self._file:
      self._file.close()
    if self._writer is not None:
      self._writer.close()


def read_metrics(workdir: str) -> list[dict]:
  with (epath.Path(workdir) / "metrics.jsonl").open() as f:
    return [json.loads(line) for line in f if line.strip()]
