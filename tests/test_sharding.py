"""A fake 8-device CPU mesh (fsdp x tensor, and pure data parallel) gives the 1-device loss series."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxtune import sharding, trainer
from train_helpers import losses, tiny_config

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_eight_device_mesh_matches_one_device(tiny_setup, tmp_path, method):
  model, data = tiny_setup
  assert jax.device_count() == 1
  reference = losses(trainer.run(tiny_config(model, data, **{"peft.method": method,
                                                             "optimizer.learning_rate": 1e-3}),
                                 str(tmp_path / "one")))
  out = subprocess.run([sys.executable, os.path.join(HERE, "sharded_run.py"), model, data, str(tmp_path),
                        method, "1,4,2", "8,1,1"], capture_output=True, text=True, timeout=900)
  assert out.returncode == 0, out.stderr[-3000:]
  results = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
  assert [r["mesh"] for r in results] == ["1,4,2", "8,1,1"]
  for r in results:
    np.testing.assert_allclose(r["losses"], reference, atol=1e-4, rtol=0, err_msg=r["mesh"])
    assert r["traces"] == 1, f"the step traced {r['traces']} times on mesh {r['mesh']}"


def test_param_shardings_follow_logical_rules():
  devices = np.array(jax.devices() * 1)
  mesh = jax.make_mesh((1, 1, 1), sharding.MESH_AXES, devices=list(devices))
  assert sharding.mesh_shape(-1, 4, 2, 8) == (1, 4, 2)
  assert sharding.mesh_shape(2, -1, 1, 8) == (2, 4, 1)
  with pytest.raises(Exception, match="mesh"):
    sharding.mesh_shape(3, 1, 1, 8)
  spec = sharding.spec_for(("layers", "embed", "q_heads"), (2, 64, 64), mesh)
  assert tuple(spec) == (None, None, None)  # size-1 axes never shard
