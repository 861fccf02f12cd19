"""train.profile_steps: a jax.profiler trace of a window of steps, and the step's ops ranked by own time."""

import inspect
import os
import re

import jax
import jax.numpy as jnp

from jaxtune import profiling, trainer
from train_helpers import losses, tiny_config


def _inner(x):
  return jnp.tanh(x)


def _middle(x):
  return _inner(x) * 2


def test_op_sources_name_the_primitive_its_line_and_the_caller():
  hlo = jax.jit(jax.grad(lambda x: jnp.sum(_middle(x)))).lower(jnp.ones(3)).compile().as_text()
  sources = profiling.op_sources(hlo)
  tanh = [sources[name] for name in re.findall(r"%([\w.\-]+) = f32\[3\]\S* tanh\(", hlo)]
  line = lambda f, text: inspect.getsourcelines(f)[1] + [l.strip() for l in inspect.getsource(f).splitlines()].index(text)
  here = os.path.basename(__file__)
  assert tanh == [f"tanh  tests/{here}:{line(_inner, 'return jnp.tanh(x)')} (_inner) < "
                  f"tests/{here}:{line(_middle, 'return _inner(x) * 2')} (_middle)"], tanh
  assert any(s.startswith("mul [backward]") for s in sources.values()), sources  # tanh's derivative


def test_self_times_count_each_op_outside_the_ops_nested_in_it_and_device_tracks_only():
  ops = {"while.1", "fusion.2", "dot.3"}
  host = [{"ph": "X", "pid": 1, "tid": 7, "ts": 0, "dur": 100, "name": "while.1"},
          {"ph": "X", "pid": 1, "tid": 7, "ts": 10, "dur": 30, "name": "fusion.2"},
          {"ph": "X", "pid": 1, "tid": 7, "ts": 50, "dur": 40, "name": "ThunkExecutor"},  # not an op: still nested
          {"ph": "X", "pid": 1, "tid": 7, "ts": 55, "dur": 20, "name": "dot.3"},
          {"ph": "X", "pid": 1, "tid": 8, "ts": 0, "dur": 5, "name": "$python frame"}]
  own, runs = profiling.self_times(host, ops)
  assert dict(own) == {"while.1": 100 - 30 - 40, "fusion.2": 30, "dot.3": 20}
  assert dict(runs) == {"while.1": 1, "fusion.2": 1, "dot.3": 1}
  device = [{"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "X", "pid": 2, "tid": 1, "ts": 0, "dur": 9, "name": "sm90_gemm", "args": {"hlo_op": "dot.3"}},
            {"ph": "X", "pid": 2, "tid": 1, "ts": 20, "dur": 4, "name": "fusion.2"}]
  own, runs = profiling.self_times(host + device, ops)  # the host's launches of the same ops drop out
  assert dict(own) == {"dot.3": 9, "fusion.2": 4} and dict(runs) == {"dot.3": 1, "fusion.2": 1}


def test_training_writes_a_trace_and_the_steps_top_ops_and_trains_the_same(tiny_setup, tmp_path, capsys):
  model, data = tiny_setup
  plain = losses(trainer.run(tiny_config(model, data), str(tmp_path / "plain")))
  # A window running past train.steps (6) ends with the run: steps 5 and 6.
  config = tiny_config(model, data, **{"train.profile_steps": 4, "train.profile_start_step": 5})
  profiled = losses(trainer.run(config, str(tmp_path / "run")))
  assert profiled == plain
  files = [f for _, _, fs in os.walk(tmp_path / "run" / "profile") for f in fs]
  assert "perfetto_trace.json.gz" in files and any(f.endswith(".xplane.pb") for f in files), files
  report = (tmp_path / "run" / "profile" / "top_ops.txt").read_text()
  assert report.startswith("2 step(s) traced") and report.splitlines()[0] in capsys.readouterr().out
  ops_ms = float(re.search(r"ms per step \(wall\), of which the step's ops ([\d.]+) ms", report).group(1))
  assert ops_ms > 0
  ops_table, line_table = report.split("\nby source line:\n")
  rows = [line.split(None, 3) for line in ops_table.splitlines()[2:] if line]
  # The projections' matmuls, forward and backward, once per layer (2 layers) and step.
  dense = [r for r in rows if re.search(r"dot_general.*models/matmul.py:\d+ \(matmul\) < models/llama.py:\d+ \(dense\)",
                                        r[3])]
  assert any("[backward]" in r[3] for r in dense) and any("[backward]" not in r[3] for r in dense), rows
  assert {float(r[2]) for r in dense} == {2.0}, dense
  assert sum(float(r[0]) for r in rows) <= ops_ms + 0.01 * len(rows)
  # The same time again by source line: the dense matmul line holds every dense row above, and more.
  by_line = {line.split(None, 2)[2]: float(line.split()[0]) for line in line_table.splitlines()[1:]}
  dense_line = dense[0][3].split("  ", 2)[2]  # op  primitive  source
  assert by_line[dense_line] >= sum(float(r[0]) for r in dense if r[3].endswith(dense_line)) - 0.01 * len(dense)
  assert abs(sum(by_line.values()) - ops_ms) <= 0.01 * len(by_line) + 0.05
