"""Runs tiny training on a fake 8-device CPU mesh; prints one JSON line per mesh (for test_sharding.py).

usage: python tests/sharded_run.py MODEL DATA WORKDIR METHOD MESH [MESH ...]   (MESH = data,fsdp,tensor[,expert])
Env SHARDED_RUN_OVERRIDES: more config overrides, a JSON object of dotted keys.
"""

import json
import os
import sys

# JAX's own spelling; the other tests' XLA_FLAGS=--xla_force_host_platform_device_count=N is the older one.
os.environ["JAX_NUM_CPU_DEVICES"] = "8"
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from jaxtune import trainer  # noqa: E402
from jaxtune.models import splash  # noqa: E402
from train_helpers import losses, tiny_config  # noqa: E402


def main(model, data, workdir, method, *meshes):
  traces = []
  original = trainer.train_step

  def counted(*args, **kwargs):
    traces.append(1)  # runs once per trace, not per call
    return original(*args, **kwargs)

  trainer.train_step = counted
  splash_traces = []
  original_splash = splash.splash_attention

  def counted_splash(*args):
    splash_traces.append(1)
    return original_splash(*args)

  splash.splash_attention = counted_splash
  overrides = json.loads(os.environ.get("SHARDED_RUN_OVERRIDES", "{}"))
  for mesh in meshes:
    d, f, t, e = (int(x) for x in (mesh + ",1").split(",")[:4])
    traces.clear()
    config = tiny_config(model, data, **{"peft.method": method, "mesh.data": d, "mesh.fsdp": f, "mesh.tensor": t,
                                         "mesh.expert": e, "optimizer.learning_rate": 1e-3, **overrides})
    splash_traces.clear()
    rows = trainer.run(config, os.path.join(workdir, mesh.replace(",", "_")))
    print(json.dumps({"mesh": mesh, "losses": losses(rows), "traces": len(traces),
                      "splash_traces": len(splash_traces)}), flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
