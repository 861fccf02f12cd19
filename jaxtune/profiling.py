"""A trace of a few training steps, and the ops of the step that took their time.

`train.profile_steps=N` traces steps train.profile_start_step .. +N-1 of process 0 with
jax.profiler into WORKDIR/profile: an XSpace for TensorBoard's profile plugin or XProf
(`tensorboard --logdir WORKDIR/profile`) and a Perfetto trace (`perfetto_trace.json.gz`, opens in
ui.perfetto.dev). Then the step's ops are ranked by their own time in the trace (time inside an op
nested in them, such as a layer loop's body, counts for the inner op) and named by the primitive and
the source line they came from, read from the compiled step's HLO metadata: WORKDIR/profile/top_ops.txt.
"""

from __future__ import annotations

import collections
import gzip
import json
import os
import re
import shutil
import tempfile
import time

import jax
from etils import epath

# XLA:GPU writes scheduling_name="..." between the op name and the frame id
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = .*?metadata=\{op_name=\"([^\"]*)\"(?:[^}]*?stack_frame_id=(\d+))?", re.M)


def _table(hlo_text: str, section: str) -> dict[str, str]:
  """The `id value` lines of one of the HLO text's trailing tables (FileNames, StackFrames, ...)."""
  match = re.search(rf"^{section}\n((?:\d+ .*\n?)*)", hlo_text, re.M)
  rows = match.group(1).splitlines() if match else []
  return dict(row.split(" ", 1) for row in rows)


def _field(record: str, name: str) -> str:
  return re.search(rf"\b{name}=(\d+)", record).group(1)


def op_sources(hlo_text: str) -> dict[str, str]:
  """Each instruction of a compiled module -> "primitive [backward] file:line (function)"."""
  files, functions = _table(hlo_text, "FileNames"), _table(hlo_text, "FunctionNames")
  locations, frames = _table(hlo_text, "FileLocations"), _table(hlo_text, "StackFrames")
  # XLA prints a frame's parent as its id + 1 (0: none), so a frame called from the one before it
  # reads as its own parent; read as written if that never happens.
  shift = int(any(_field(record, "parent_frame_id") == i for i, record in frames.items()))
  sources = {}
  for name, op_name, frame in _INSTRUCTION.findall(hlo_text):
    label = op_name.rsplit("/", 1)[-1] + (" [backward]" if "transpose(" in op_name else "")
    calls = []
    while frame in frames and len(calls) < 2:  # the line and its caller
      location = locations[_field(frames[frame], "file_location_id")]
      path = files[_field(location, "file_name_id")].strip('"')
      function = functions[_field(location, "function_name_id")].strip('"')
      calls.append(f"{'/'.join(path.split('/')[-2:])}:{_field(location, 'line')} ({function})")
      frame = str(int(_field(frames[frame], "parent_frame_id")) - shift)
    sources[name] = "  ".join([label, " < ".join(calls)]).rstrip()
  return sources


LIBRARY_KERNEL = "(a kernel of no op the step's HLO names: cuBLAS, cuDNN, copies)"


def self_times(events: list[dict], names) -> tuple[collections.Counter, collections.Counter]:
  """Microseconds each named op spent outside the ops nested in it, and how often it ran.

  Only complete events ("ph": "X") whose name (or args.hlo_op) is in `names` are reported; when the
  trace has device tracks ("/device:..." processes), only theirs, so host-side launches of the same
  ops do not count twice. On a GPU a fusion's kernel is named after the op with "." and "-" as "_"
  (`loop_convert_fusion_4` for `loop_convert_fusion.4`), and inside a CUDA graph args.hlo_op names
  only the graph (`command_buffer_1`): a device kernel that no op matches (cuBLAS's `nvjet_*`,
  cuDNN's attention) is reported under its own name (see LIBRARY_KERNEL)."""
  processes = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
  on_device = {pid for pid, name in processes.items() if name.startswith("/device:")}
  kernel_names = {re.sub(r"[.\-]", "_", name): name for name in names}

  def op_of(e: dict) -> str | None:
    for candidate in (e["name"], e.get("args", {}).get("hlo_op")):
      op = candidate if candidate in names else kernel_names.get(candidate)
      if op is not None:
        return op
    return e["name"] if on_device else None

  threads = collections.defaultdict(list)
  for e in events:
    if e.get("ph") == "X" and "dur" in e and (not on_device or e["pid"] in on_device):
      threads[(e["pid"], e.get("tid"))].append(e)
  own, runs = collections.Counter(), collections.Counter()
  for thread_events in threads.values():
    thread_events.sort(key=lambda e: (e["ts"], -e["dur"]))
    open_events = []  # (op name or None, end time) of the enclosing events
    for e in thread_events:
      while open_events and open_events[-1][1] <= e["ts"]:
        open_events.pop()
      op = op_of(e)
      if on_device:  # a stream's kernels run one after another (their ends and starts may overlap by a rounding)
        open_events.clear()
      if open_events and open_events[-1][0] is not None:
        own[open_events[-1][0]] -= e["dur"]
      if op is not None:
        own[op] += e["dur"]
        runs[op] += 1
      open_events.append((op, e["ts"] + e["dur"]))
  return own, runs


def perfetto_events(trace_dir: str) -> list[dict]:
  """The events of the newest perfetto_trace.json.gz under trace_dir ([] when there is none)."""
  found = [os.path.join(root, f) for root, _, files in os.walk(trace_dir) for f in files
           if f == "perfetto_trace.json.gz"]
  if not found:
    return []
  with gzip.open(max(found, key=os.path.getmtime)) as f:
    trace = json.load(f)
  return trace["traceEvents"] if isinstance(trace, dict) else trace


def top_ops_report(events: list[dict], hlo_text: str, steps: int, wall_seconds: float, n: int = 30) -> str:
  """The step's ops by own time, per step, as a text table."""
  sources = op_sources(hlo_text)
  own, runs = self_times(events, sources)
  total = sum(own.values())
  lines = [f"{steps} step(s) traced, {wall_seconds / steps * 1e3:.1f} ms per step (wall), of which the step's "
           f"ops {total / steps / 1e3:.1f} ms (own time; summed over threads or streams)",
           f"{'ms/step':>9} {'share':>6} {'runs/step':>9}  op  primitive  source"]
  for op, us in own.most_common(n):
    source = sources.get(op, LIBRARY_KERNEL)
    lines.append(f"{us / steps / 1e3:9.2f} {us / max(total, 1e-9):6.1%} {runs[op] / steps:9.1f}  {op[:90]}  {source}")
  if not own:
    lines.append("(no op of the step in the trace: this backend names its events differently)")
  by_line = collections.Counter()  # forward and backward ops of one source line together
  for op, us in own.items():
    if op in sources:
      by_line[sources[op].partition("  ")[2] or "(no source line)"] += us
    else:  # library kernels by family: nvjet (cuBLAS), cudnn, memcpy32...
      family = re.match(r"(?:void )?([a-zA-Z]*)", op).group(1)
      by_line[f"{family}* {LIBRARY_KERNEL}"] += us
  lines += ["", "by source line:", f"{'ms/step':>9} {'share':>6}  source"]
  lines += [f"{us / steps / 1e3:9.2f} {us / max(total, 1e-9):6.1%}  {line}" for line, us in by_line.most_common(n)]
  return "\n".join(lines) + "\n"


class StepProfiler:
  """Traces steps [start, start + count) of this process (when enabled) into `directory`; a gs://
  one gets the files once the trace is written (to a local folder first: jax.profiler's Perfetto
  export reads the trace back with local file calls)."""

  def __init__(self, directory: str, start: int, count: int, enabled: bool = True):
    self.directory, self.start, self.last = directory, start, start + count - 1
    self.remote = "://" in directory
    self.local = directory  # where jax.profiler writes: a temporary folder for a gs:// directory
    self.enabled = enabled and count > 0
    self.hlo_text, self.began, self.steps = None, 0.0, 0

  def before_step(self, step: int, lowered, inputs) -> None:
    """Starts the trace at the window's first step, once `inputs` (the previous step's outputs) are
    ready; `lowered()` gives the step's jax Lowered (its compiled form is cached by then)."""
    if self.enabled and step == self.start:
      self.hlo_text = lowered().compile().as_text()
      jax.block_until_ready(inputs)
      self.local = tempfile.mkdtemp(prefix="jaxtune_profile_") if self.remote else self.directory
      os.makedirs(self.local, exist_ok=True)
      jax.profiler.start_trace(self.local, create_perfetto_trace=True)
      self.began = time.perf_counter()

  def after_step(self, step: int, outputs) -> None:
    if self.hlo_text is not None:
      self.steps += 1
      if step == self.last:
        self.finish(outputs)

  def finish(self, outputs=None) -> None:
    """Stops a running trace (at the window's end, or early: the run ended or failed inside it)."""
    if self.hlo_text is None:
      return
    jax.block_until_ready(outputs)
    wall = time.perf_counter() - self.began
    jax.profiler.stop_trace()
    report = top_ops_report(perfetto_events(self.local), self.hlo_text, max(self.steps, 1), wall)
    with open(os.path.join(self.local, "top_ops.txt"), "w") as f:
      f.write(report)
    if self.remote:
      for root, _, files in os.walk(self.local):
        target = epath.Path(self.directory) / os.path.relpath(root, self.local)
        target.mkdir(parents=True, exist_ok=True)
        for name in files:
          epath.Path(os.path.join(root, name)).copy(target / name, overwrite=True)
      shutil.rmtree(self.local)
    self.hlo_text = None
    print(f"profile of {self.steps} step(s): {self.directory} (TensorBoard/XProf, or perfetto_trace.json.gz "
          f"in ui.perfetto.dev); top ops:\n" + "".join(report.splitlines(keepends=True)[:12]), flush=True)
