"""A fake 8-device CPU mesh (fsdp x tensor, and pure data parallel) gives the 1-device loss series."""

import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from jaxtune import sharding, trainer
from jaxtune.models import llama
from train_helpers import losses, make_tiny_setup, tiny_config, without_torch

HERE = os.path.dirname(os.path.abspath(__file__))


SCHEDULER_OFF = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


@pytest.mark.parametrize("env,scheduler_flags", [
    ({"JAX_NUM_CPU_DEVICES": "8"}, [SCHEDULER_OFF]),
    ({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}, [SCHEDULER_OFF]),
    ({"JAX_NUM_CPU_DEVICES": "1"}, []),
    ({}, []),
    ({"JAX_NUM_CPU_DEVICES": "8", "XLA_FLAGS": "--xla_cpu_enable_concurrency_optimized_scheduler=true"},
     ["--xla_cpu_enable_concurrency_optimized_scheduler=true"]),  # the user's own setting wins
])
def test_fake_cpu_meshes_compile_with_the_default_scheduler(env, scheduler_flags):
  """Either spelling of a fake multi-device CPU mesh turns XLA:CPU's concurrency-optimised scheduler off
  (it deadlocked the prompt step on 2x2x2; the mesh test below runs that case with JAX_NUM_CPU_DEVICES)."""
  clean = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
  out = subprocess.run([sys.executable, "-c", "import os, jaxtune; print(os.environ.get('XLA_FLAGS', ''))"],
                       capture_output=True, text=True, timeout=120, env={**clean, **env}, check=True,
                       cwd=os.path.dirname(HERE))  # this checkout's jaxtune
  assert [f for f in out.stdout.split() if "concurrency_optimized_scheduler" in f] == scheduler_flags


# dora: its norm reduces over a kernel's fsdp-sharded input axis; prompt: a batch-1 pass inside the
# step: both on one mesh that splits all three axes. (ia3 passed too, 27 Nov 2026; its vectors
# shard like biases, so it is left out of CI.)
@pytest.mark.parametrize("method,meshes", [("full", ["1,4,2", "8,1,1"]), ("lora", ["1,4,2", "8,1,1"]),
                                           ("dora", ["2,2,2"]), ("prompt", ["2,2,2"])])
def test_eight_device_mesh_matches_one_device(tiny_setup, tmp_path, method, meshes):
  assert_meshes_match_one_device(*tiny_setup, tmp_path, method, meshes)


def test_gemma2_on_an_fsdp_tensor_mesh_matches_one_device(tmp_path):
  """Gemma 2's own parts (sandwich norms, windowed layers picked inside the scan, soft-capped scores
  and logits) under fsdp x tensor sharding."""
  assert_meshes_match_one_device(*make_tiny_setup(str(tmp_path), "gemma2"), tmp_path, "full", ["1,4,2"])


def test_mixtral_on_an_fsdp_tensor_expert_mesh_matches_one_device(tmp_path):
  """Experts (L x E x in x out) split E over mesh.expert and their in/out dims like the dense MLP's
  kernels; the batch splits over data, fsdp and expert; the router, the routing weights and the
  tokens grouped by expert follow: the ragged dispatch on the mesh gives the dense dispatch's losses
  on one device."""
  assert_meshes_match_one_device(*make_tiny_setup(str(tmp_path), "mixtral"), tmp_path, "full", ["1,2,2,2"],
                                 {"model.moe_dispatch": "dense"}, mesh_overrides={"model.moe_dispatch": "ragged"})


def test_phi3_on_an_fsdp_tensor_mesh_matches_one_device(tmp_path):
  """Phi-3's fused qkv_proj / gate_up_proj (and their LoRA B) shard over their whole output; the split
  into q, k, v and gate, up crosses the tensor shards. Longrope and partial rotary run inside."""
  assert_meshes_match_one_device(*make_tiny_setup(str(tmp_path), "phi3_longrope"), tmp_path, "lora", ["1,4,2"])


def test_lora_on_experts_on_an_expert_mesh_matches_one_device(tmp_path):
  """LoRA on every expert (peft.lora.expert_targets; the experts frozen, sharded like their kernels,
  their A and B split by expert over mesh.expert) through the dense dispatch (the ragged one on an
  expert mesh: the Mixtral test above)."""
  assert_meshes_match_one_device(*make_tiny_setup(str(tmp_path), "qwen3_moe"), tmp_path, "lora", ["1,2,1,4"],
                                 {"model.moe_dispatch": "dense", "peft.lora.expert_targets": ".*"})


EXPERTS_STAY_PUT = """
import re
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jaxtune import sharding
from jaxtune.models import moe
E, D, F, N = 8, 64, 96, 256
keys = jax.random.split(jax.random.PRNGKey(0), 5)
mlp = {"router": {"kernel": jax.random.normal(keys[0], (D, E))},
       "experts": {name: jax.random.normal(key, (E, F, D) if name == "down_proj" else (E, D, F)) * 0.1
                   for name, key in zip(moe.EXPERTS, keys[1:4])}}
h = jax.random.normal(keys[4], (N, D))
mesh = sharding.make_mesh(1, 2, 1, expert=4)
def loss(mlp, h, dispatch):
  return jnp.sum(moe.moe_mlp(mlp, h, 2, True, lambda g, u: jax.nn.silu(g) * u, dispatch)[0] ** 2)
for dispatch in ("dense", "ragged"):
  step = jax.jit(jax.value_and_grad(loss), static_argnums=2)
  expected = step(mlp, h, dispatch)
  with jax.set_mesh(mesh):
    placed = jax.device_put(mlp, {"router": {"kernel": NamedSharding(mesh, P())},
                                  "experts": {n: NamedSharding(mesh, P("expert")) for n in moe.EXPERTS}})
    rows = jax.device_put(h, NamedSharding(mesh, P(sharding.BATCH_AXES)))
    text = step.lower(placed, rows, dispatch).compile().as_text()
    got = step(placed, rows, dispatch)
  gathered = re.findall(r"= (\\S+) all-gather(?:-start)?\\(", text)
  assert gathered, dispatch  # the tokens are gathered over the expert axis
  assert not [s for s in gathered if s.startswith(f"f32[{E},")], (dispatch, gathered)  # never an expert stack
  np.testing.assert_allclose(got[0], expected[0], rtol=1e-5)
  for name in moe.EXPERTS:
    np.testing.assert_allclose(got[1]["experts"][name], expected[1]["experts"][name], rtol=1e-4, atol=1e-4)
print("ok")
"""


def test_experts_stay_on_their_devices_on_an_expert_mesh():
  """On an fsdp=2 x expert=4 mesh each device runs its own two experts: the compiled forward and
  backward pass gathers tokens, never a stack of experts' weights, in either dispatch, and gives
  one device's loss and expert gradients."""
  run_on_eight_devices(EXPERTS_STAY_PUT)


SHARDED_LOAD = """
import collections
import numpy as np
from jaxtune import sharding
from jaxtune.models import llama, loading
mesh = sharding.make_mesh(1, 2, 2, expert=2)
for folder in FOLDERS:
  cfg = loading.model_config_of(folder)
  get, tensor_shapes = loading.safetensors_getter(folder)
  read, slices = collections.Counter(), 0
  def counted(name, index=None):
    global slices
    t = get(name, index)
    read[name] += t.size
    slices += t.size < np.prod(tensor_shapes[name])
    return t
  shapes = loading.flatten(llama.param_shapes(cfg), is_leaf=lambda x: isinstance(x, tuple))
  shardings = sharding.param_shardings(shapes, mesh)
  placed = loading.flatten(loading.params_from_tensors(cfg, counted, shardings=shardings, tensor_shapes=tensor_shapes))
  whole = loading.flatten(loading.params_from_tensors(cfg, get))
  assert {n: int(np.prod(tensor_shapes[n])) for n in read} == dict(read)  # every element read once
  assert slices > len(read), (slices, len(read))  # most tensors are read in parts
  assert sum(not placed[p].sharding.is_fully_replicated for p in placed) >= 7
  for path, leaf in placed.items():
    assert leaf.sharding == shardings[path], path
    np.testing.assert_array_equal(leaf, whole[path], err_msg=path)
print("ok")
"""


def test_a_sharded_load_reads_each_device_slice_once(tmp_path):
  """Loading onto an fsdp=2 x expert=2 x tensor=2 mesh reads only the slices the devices hold: each
  element of each checkpoint tensor once (a slice shared by devices is read once), most tensors in
  parts; every leaf has its sharding and equals the unsharded load (a Llama and a Mixtral, whose
  experts split over the expert axis)."""
  folders = [make_tiny_setup(str(tmp_path / family), family)[0] for family in ("llama_untied", "mixtral")]
  run_on_eight_devices(f"FOLDERS = {folders!r}\n" + SHARDED_LOAD)


def run_on_eight_devices(script: str) -> None:
  """Runs a test script in a process with eight fake CPU devices; it must print "ok" last."""
  env = without_torch(dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8"))
  out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                       env=env, cwd=os.path.dirname(HERE))
  assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


def test_qlora_on_an_fsdp_tensor_mesh_matches_one_device(tiny_setup, tmp_path):
  """NF4 codes (out x in/2) and block scales sharded like their kernels, here double-quantized (the
  8-bit scale codes split like plain float32 scales, their second-level scales and offsets on every
  device): each device dequantizes its slice, and the losses are one device's."""
  assert_meshes_match_one_device(*tiny_setup, tmp_path, "lora", ["1,4,2"], {"model.quantize": "nf4_double_quant"})


def assert_meshes_match_one_device(model, data, tmp_path, method, meshes, overrides=None, mesh_overrides=None):
  assert jax.device_count() == 1
  overrides = overrides or {}
  reference = losses(trainer.run(tiny_config(model, data, **{"peft.method": method,
                                                             "optimizer.learning_rate": 1e-3, **overrides}),
                                 str(tmp_path / "one")))
  env = dict(os.environ, SHARDED_RUN_OVERRIDES=json.dumps({**overrides, **(mesh_overrides or {})}))
  out = subprocess.run([sys.executable, os.path.join(HERE, "sharded_run.py"), model, data, str(tmp_path),
                        method, *meshes], capture_output=True, text=True, timeout=900, env=without_torch(env))
  assert out.returncode == 0, out.stderr[-3000:]
  results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  assert [r["mesh"] for r in results] == meshes
  for r in results:
    np.testing.assert_allclose(r["losses"], reference, atol=1e-4, rtol=0, err_msg=r["mesh"])
    assert r["traces"] == 1, f"the step traced {r['traces']} times on mesh {r['mesh']}"


def test_splash_attention_sharded_matches_blocked_on_one_device(tiny_setup, tmp_path):
  """model.attention=splash on a data x fsdp x tensor mesh: each device runs the kernel (in Pallas'
  interpreter here) on its rows and heads inside shard_map; the losses equal jaxtune's blocked
  attention on one device. The splash kernel is traced in every layer's scan body."""
  model, data = tiny_setup
  rows_of_128 = {"data.seq_len": 128, "train.steps": 3}  # sharded_run.py sets the method and learning rate
  reference = losses(trainer.run(tiny_config(model, data, **rows_of_128, **{
      "peft.method": "lora", "optimizer.learning_rate": 1e-3, "model.attention": "blocked"}), str(tmp_path / "one")))
  env = dict(os.environ, SHARDED_RUN_OVERRIDES=json.dumps({**rows_of_128, "model.attention": "splash"}))
  out = subprocess.run([sys.executable, os.path.join(HERE, "sharded_run.py"), model, data, str(tmp_path),
                        "lora", "2,2,2"], capture_output=True, text=True, timeout=900, env=without_torch(env))
  assert out.returncode == 0, out.stderr[-3000:]
  (result,) = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  assert result["splash_traces"] >= 1
  np.testing.assert_allclose(result["losses"], reference, atol=1e-4, rtol=0)


def test_dcn_data_groups_whole_slices_or_processes():
  """mesh.dcn_data=2 on 8 devices listed interleaved across two slices (or two processes): each data
  group is one slice's (process's) devices, so fsdp and tensor never cross between them."""
  def fake(i, **where):
    return types.SimpleNamespace(**{"id": i, "platform": "cpu", "device_kind": "cpu", "process_index": 0, **where})
  shape = sharding.mesh_shape(2, 2, 2, 8)
  for key in ("slice_index", "process_index"):
    devices = [fake(i, **{key: i % 2}) for i in range(8)]
    grid = sharding.hybrid_device_grid(shape, 2, devices)
    assert grid.shape == (2, 2, 1, 2)
    assert [sorted({getattr(d, key) for d in group.reshape(-1)}) for group in grid] == [[0], [1]], key
  with pytest.raises(Exception, match="mesh.dcn_data"):
    sharding.hybrid_device_grid(shape, 4, devices)  # two processes, not four
  with pytest.raises(Exception, match="do not divide"):
    sharding.hybrid_device_grid(sharding.mesh_shape(1, 4, 2, 8), 2, devices)


def test_param_shardings_follow_logical_rules():
  devices = np.array(jax.devices() * 1)
  mesh = jax.make_mesh((1, 1, 1, 1), sharding.MESH_AXES, devices=list(devices))
  assert sharding.mesh_shape(-1, 4, 2, 8) == dict(data=1, fsdp=4, expert=1, tensor=2)
  assert sharding.mesh_shape(2, -1, 1, 8) == dict(data=2, fsdp=4, expert=1, tensor=1)
  assert sharding.mesh_shape(1, 2, 1, 8, expert=-1) == dict(data=1, fsdp=2, expert=4, tensor=1)
  with pytest.raises(Exception, match="mesh"):
    sharding.mesh_shape(3, 1, 1, 8)
  spec = sharding.spec_for(("layers", "embed", "q_heads"), (2, 64, 64), mesh)
  assert tuple(spec) == (None, None, None)  # size-1 axes never shard
  expert_mesh = types.SimpleNamespace(shape=dict(data=1, fsdp=2, expert=4, tensor=1))  # spec_for reads .shape
  for path, shape, expected in [
      ("layers/mlp/experts/gate_proj", (2, 8, 64, 96), (None, "expert", "fsdp", None)),
      ("layers/mlp/experts/down_proj", (2, 8, 96, 64), (None, "expert", None, "fsdp")),
      ("layers/mlp/expert_lora/gate_up_proj/lora_a", (2, 8, 64, 4), (None, "expert", None, None)),
      ("layers/mlp/expert_lora/down_proj/lora_b", (2, 8, 4, 64), (None, "expert", None, None)),
      ("layers/mlp/experts/up_proj", (2, 6, 64, 96), (None, None, "fsdp", None)),  # 6 experts do not split in 4
      ("layers/mlp/router/kernel", (2, 64, 8), (None, None, None))]:  # small: every device has it
    assert tuple(sharding.spec_for(llama.logical_axes(path, len(shape)), shape, expert_mesh)) == expected, path


SPLASH_ON_MESH = """
import jax, jax.numpy as jnp, numpy as np
from jaxtune import sharding
from jaxtune.models import splash
B, T, N, K, H = 4, 128, 4, 2, 16
q, k, v = (jax.random.normal(jax.random.PRNGKey(i), (B, T, n, H)) for i, n in enumerate((N, K, K)))
segments = jnp.asarray(np.repeat([[1] * 60 + [2] * 60 + [0] * 8], B, 0))
attend = jax.jit(splash.splash_attention)
expected = np.asarray(attend(q, k, v, segments))
for shape in ((2, 2, 2), (1, 2, 4)):  # tensor=4 does not divide the 2 kv heads: heads stay whole
  mesh = sharding.make_mesh(*shape)
  with jax.set_mesh(mesh):
    text = attend.lower(q, k, v, segments).as_text()
    got = attend(q, k, v, segments)
  assert "shard_map" in text or "manual" in text.lower(), shape
  np.testing.assert_allclose(got, expected, atol=1e-5, err_msg=str(shape))
print("ok")
"""


def test_splash_kernel_runs_per_device_under_a_mesh():
  """Under the run's mesh the splash kernel is placed in shard_map (a Pallas TPU kernel cannot be
  partitioned by XLA), on meshes whose tensor axis does and does not divide the kv heads."""
  run_on_eight_devices(SPLASH_ON_MESH)
