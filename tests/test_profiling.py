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
  # XLA:GPU's printer puts scheduling_name="..." between the op name and the frame id
  gpu_form = re.sub(r'(op_name="[^"]*")( stack_frame_id)', r'\1 scheduling_name="x"\2', hlo)
  assert gpu_form != hlo and profiling.op_sources(gpu_form) == sources


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


def test_self_times_and_report_read_an_xla_gpu_trace():
  """Events as XLA:GPU writes them (seen on an H100, jax 0.11.2): a fusion's kernel is named after
  the op with "_" for ".", inside a CUDA graph whose args.hlo_op names only the graph; cuBLAS,
  cuDNN and copy kernels match no op and count under their own names, by family in the per-line
  table; a stream's kernels may overlap by a rounding, which is not nesting."""
  ops = {"loop_convert_fusion.4", "input_reduce_fusion", "custom-call.3"}
  graph = {"hlo_op": "command_buffer_1", "hlo_module": "jit_train_step"}
  events = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "pid": 9, "name": "process_name", "args": {"name": "/host:CPU"}},
            {"ph": "X", "pid": 1, "tid": 14, "ts": 0.0, "dur": 10.0, "name": "loop_convert_fusion_4", "args": graph},
            {"ph": "X", "pid": 1, "tid": 14, "ts": 9.999, "dur": 5.0, "name": "nvjet_sm90_tst_128x160_NNT", "args": graph},
            {"ph": "X", "pid": 1, "tid": 14, "ts": 15.0, "dur": 3.0, "name": "input_reduce_fusion", "args": graph},
            {"ph": "X", "pid": 1, "tid": 14, "ts": 20.0, "dur": 2.0, "name": "nvjet_sm90_tss_256x128_TNT",
             "args": {"hlo_op": "custom-call.3"}},  # outside a graph the gemm's op is named
            {"ph": "X", "pid": 1, "tid": 14, "ts": 30.0, "dur": 4.0, "name": "memcpy32_post", "args": graph},
            {"ph": "X", "pid": 9, "tid": 3, "ts": 0.0, "dur": 50.0, "name": "input_reduce_fusion"}]  # a launch
  own, runs = profiling.self_times(events, ops)
  assert dict(own) == {"loop_convert_fusion.4": 10.0, "nvjet_sm90_tst_128x160_NNT": 5.0, "input_reduce_fusion": 3.0,
                       "custom-call.3": 2.0, "memcpy32_post": 4.0}
  assert set(runs.values()) == {1}
  hlo = "\n".join(f'%{op} = f32[2] fusion(%p), metadata={{op_name="jit(f)/{prim}"}}' for op, prim in
                   (("loop_convert_fusion.4", "convert_element_type"), ("input_reduce_fusion", "reduce_sum"),
                    ("custom-call.3", "dot_general")))
  report = profiling.top_ops_report(events, hlo, steps=1, wall_seconds=40e-6)
  rows = report.splitlines()[2:7]
  assert [r.split()[1] for r in rows] == ["41.7%", "20.8%", "16.7%", "12.5%", "8.3%"], rows  # of 24 us
  assert rows[0].endswith("loop_convert_fusion.4  convert_element_type"), rows
  by_line = report[report.index("by source line:"):]
  assert f"nvjet* {profiling.LIBRARY_KERNEL}" in by_line and f"memcpy* {profiling.LIBRARY_KERNEL}" in by_line
  assert "  memcpy32_post  " + profiling.LIBRARY_KERNEL in report


def test_training_writes_a_trace_and_the_steps_top_ops_and_trains_the_same(tiny_setup, tmp_path, capsys):
  model, data = tiny_setup
  scan = {"model.layer_loop": "scan"}  # one op per layer loop, counted below (GPUs unroll it)
  plain = losses(trainer.run(tiny_config(model, data, **scan), str(tmp_path / "plain")))
  # A window running past train.steps (6) ends with the run: steps 5 and 6.
  config = tiny_config(model, data, **{"train.profile_steps": 4, "train.profile_start_step": 5}, **scan)
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
