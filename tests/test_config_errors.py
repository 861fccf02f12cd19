"""Every config mistake given to scripts/train.py: exit code 2, ONE line `error: ...` naming the key
as stderr's last line, no traceback, before any work, and the workdir left exactly as it was."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from train_helpers import without_torch

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(HERE, "..", "scripts", "train.py")
TINY = os.path.join(HERE, "..", "configs", "tiny.py")

# (case id, extra flags, fake devices, what the error line must contain)
CASES = [
    ("unknown_key", ["--config.train.stepz=3"], 1,
     "error: --config.train.stepz: unknown config key 'stepz' (Did you mean \"steps\""),
    ("unknown_section", ["--config.trainz.steps=3"], 1, "error: --config.trainz.steps: unknown config key 'trainz'"),
    ("wrong_type", ["--config.train.steps=abc"], 1, "error: flag --config.train.steps=abc: invalid literal for int()"),
    ("float_for_int", ["--config.train.batch_size=4.5"], 1, "error: flag --config.train.batch_size=4.5:"),
    ("missing_value", ["--config.train.steps"], 1, "error: Missing value for flag --config.train.steps"),
    ("unknown_flag", ["--stepz=3"], 1, "error: Unknown command line flag 'stepz'"),
    ("stray_argument", ["steps=3"], 1, "error: unexpected arguments: steps=3"),
    ("steps_zero", ["--config.train.steps=0"], 1, "error: config.train.steps: must be > 0, got 0"),
    ("steps_negative", ["--config.train.steps=-5"], 1, "error: config.train.steps: must be > 0, got -5"),
    ("lora_rank_zero", ["--config.peft.lora.rank=0"], 1, "error: config.peft.lora.rank: must be > 0, got 0"),
    ("lora_on_lm_head", ["--config.peft.lora.targets=.*"], 1, "error: config.peft.lora.targets: '.*' matches lm_head"),
    ("ia3_on_lm_head", ["--config.peft.method=ia3", "--config.peft.ia3.targets=.*"], 1,
     "error: config.peft.ia3.targets: '.*' matches lm_head"),
    ("profile_steps_negative", ["--config.train.profile_steps=-1"], 1,
     "error: config.train.profile_steps: must be >= 0, got -1"),
    ("profile_after_the_last_step", ["--config.train.profile_steps=2", "--config.train.profile_start_step=21"], 1,
     "error: config.train.profile_start_step: 21 > train.steps=20: no step would be profiled"),
    ("num_proc_negative", ["--config.data.num_proc=-2"], 1, "error: config.data.num_proc: must be >= 0, got -2"),
    ("muon_with_lora", ["--config.optimizer.name=muon"], 1,
     "error: config.optimizer.name: muon orthogonalizes the decoder's weight matrices, which only "
     "peft.method=full trains (peft.method=lora)"),
    ("unknown_decay_shape", ["--config.optimizer.decay_shape=exp"], 1,
     "error: config.optimizer.decay_shape: 'exp' is not one of linear | cosine | 1-sqrt"),
    ("decay_longer_than_the_run", ["--config.optimizer.schedule=wsd", "--config.optimizer.decay_steps=25"], 1,
     "error: config.optimizer.decay_steps: 25 + optimizer.warmup_steps=0 > train.steps=20"),
    ("unknown_remat_policy", ["--config.train.remat_policy=some"], 1,
     "error: config.train.remat_policy: 'some' is not one of nothing | dots"),
    ("unknown_attention", ["--config.model.attention=flash"], 1,
     "error: config.model.attention: 'flash' is not one of auto | blocked | xla | cudnn | splash"),
    ("unknown_layer_loop", ["--config.model.layer_loop=remat"], 1,
     "error: config.model.layer_loop: 'remat' is not one of auto | scan | unrolled"),
    ("lora_plus_without_lora", ["--config.peft.method=full", "--config.optimizer.lora_plus_ratio=16"], 1,
     "error: config.optimizer.lora_plus_ratio: LoRA+ sets the learning rate of LoRA's B matrices: peft.method=full"),
    ("unknown_moe_dispatch", ["--config.model.moe_dispatch=sparse"], 1,
     "error: config.model.moe_dispatch: 'sparse' is not one of auto | dense | ragged"),
    ("router_aux_loss_on_a_dense_model", ["--config.train.router_aux_loss_coef=0.02"], 1,
     "error: config.train.router_aux_loss_coef:"),
    ("expert_lora_on_a_dense_model", ["--config.peft.lora.expert_targets=down_proj"], 1,
     "error: config.peft.lora.expert_targets: "),
    ("expert_lora_matching_nothing", ["--config.peft.lora.expert_targets=w1"], 1,
     "error: config.peft.lora.expert_targets: 'w1' matches neither gate_up_proj nor down_proj"),
    ("expert_lora_with_dora", ["--config.peft.method=dora", "--config.peft.lora.expert_targets=.*"], 1,
     "error: config.peft.lora.expert_targets: DoRA on experts is not supported"),
    ("expert_lora_with_dropout", ["--config.peft.lora.expert_targets=.*", "--config.peft.lora.dropout=0.1"], 1,
     "error: config.peft.lora.dropout: must be 0 with peft.lora.expert_targets"),
    ("unknown_quantization", ["--config.model.quantize=int4"], 1,
     "error: config.model.quantize: 'int4' is not one of '' | nf4 | fp4 | nf4_double_quant | fp4_double_quant"),
    ("quantized_full_fine_tuning", ["--config.model.quantize=nf4", "--config.peft.method=full"], 1,
     "error: config.model.quantize: nf4 stores the base frozen; full fine-tuning trains it"),
    ("cudnn_in_float32", ["--config.model.attention=cudnn"], 1,
     "error: config.model.attention: cudnn needs precision.compute_dtype=bfloat16 or float16"),
    ("cudnn_without_gpu", ["--config.model.attention=cudnn", "--config.precision.compute_dtype=bfloat16"], 1,
     "error: config.model.attention: cudnn needs a GPU; this run's devices are cpu"),
    ("unknown_method", ["--config.peft.method=qlora"], 1,
     "error: config.peft.method: 'qlora' is not one of full | lora | dora | ia3 | adapter | prefix | prompt"),
    ("unknown_objective", ["--config.objective=ppo2"], 1, "error: config.objective: 'ppo2' is not one of"),
    ("bad_learning_rate", ["--config.optimizer.learning_rate=-1e-3"], 1,
     "error: config.optimizer.learning_rate: must be > 0"),
    ("adam_beta_too_big", ["--config.optimizer.b1=1.5"], 1, "error: config.optimizer.b1: must be in [0, 1), got 1.5"),
    ("adam_beta_negative", ["--config.optimizer.b2=-3"], 1, "error: config.optimizer.b2: must be in [0, 1), got -3.0"),
    ("adam_eps_negative", ["--config.optimizer.eps=-1"], 1, "error: config.optimizer.eps: must be >= 0, got -1.0"),
    ("mesh_not_devices", ["--config.mesh.data=3"], 1, "error: config.mesh: data*fsdp*expert*tensor = 3*1*1*1 = 3 != 1 devices"),
    ("mesh_expert_zero", ["--config.mesh.expert=0"], 1,
     "error: config.mesh.expert: must be a positive integer or -1 (fill), got 0"),
    ("mesh_two_fills", ["--config.mesh.expert=-1"], 1,
     "error: config.mesh: at most one of mesh.data/fsdp/expert/tensor may be -1"),
    ("mesh_dcn_zero", ["--config.mesh.dcn_data=0"], 1, "error: config.mesh.dcn_data: must be a positive integer, got 0"),
    ("mesh_dcn_one_process", ["--config.mesh.dcn_data=2", "--config.train.batch_size=4"], 2,
     "error: config.mesh.dcn_data: 2 groups: Number of slices 1 must equal the product of dcn_mesh_shape"),
    ("mesh_cannot_fill", ["--config.mesh.fsdp=3"], 8,
     "error: config.mesh.data: cannot fill: 8 devices are not divisible by the other mesh axes' product 3"),
    ("batch_not_divisible", ["--config.train.batch_size=6"], 4,
     "error: config.train.batch_size: 6 is not divisible by the data axes (mesh.data*mesh.fsdp*mesh.expert = 4)"),
    ("micro_batch_not_divisible", ["--config.train.batch_size=8", "--config.train.grad_accum=4"], 4,
     "error: config.train.grad_accum: each micro-batch must still divide over mesh.data*mesh.fsdp*mesh.expert"),
    ("missing_config_file", ["--config=configs/nope.py"], 1,
     "error: --config: cannot load: OSError: [Errno 2] No such file or directory: 'configs/nope.py'"),
]


def snapshot(folder) -> dict[str, tuple[int, str]]:
  """path -> (mtime_ns, sha256) of every file under `folder`."""
  out = {}
  for root, _, files in os.walk(folder):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, folder)] = (os.stat(path).st_mtime_ns, hashlib.sha256(f.read()).hexdigest())
  return out


def train(workdir, extra, model, data, devices=1, wait=True, cwd=None):
  env = without_torch(dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}"))
  args = [sys.executable, TRAIN, "--config", TINY, "--workdir", str(workdir), f"--config.model.path={model}",
          "--config.optimizer.warmup_steps=0",
          f"--config.data.train={data}", "--config.data.eval=", "--config.data.seq_len=64", *extra]
  proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd)
  return proc.communicate(timeout=300) + (proc.returncode,) if wait else proc


def assert_one_line_error(out, err, rc, expected):
  assert rc == 2, (rc, err[-2000:])
  assert "Traceback" not in err, err[-3000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith(expected), last
  return last


@pytest.fixture(scope="module")
def results(tiny_setup, tmp_path_factory):
  """All cases run at once (each is mostly interpreter start-up)."""
  model, data = tiny_setup
  root = tmp_path_factory.mktemp("config_errors")
  procs = {name: train(root / name, extra, model, data, devices, wait=False) for name, extra, devices, _ in CASES}
  return root, {name: p.communicate(timeout=300) + (p.returncode,) for name, p in procs.items()}


@pytest.mark.parametrize("name,expected", [(c[0], c[3]) for c in CASES], ids=[c[0] for c in CASES])
def test_config_mistake_is_one_line_before_any_work(results, name, expected):
  root, outs = results
  assert_one_line_error(*outs[name], expected)
  assert not os.path.exists(root / name), "the workdir was created"


def fill_workdir(workdir, config_json):
  os.makedirs(workdir / "checkpoints" / "10")
  (workdir / "config.json").write_text(json.dumps(config_json))
  (workdir / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n')
  (workdir / "checkpoints" / "10" / "data").write_bytes(b"weights")


def test_workdir_of_an_incompatible_run_is_refused_untouched(tiny_setup, tmp_path):
  model, data = tiny_setup
  sys.path.insert(0, os.path.join(HERE, ".."))
  from configs.tiny import get_config
  old = get_config()
  old.model.path, old.data.train, old.data.eval, old.data.seq_len = model, data, "", 64
  old.peft.method = "full"
  fill_workdir(tmp_path, json.loads(old.to_json()))
  before = snapshot(tmp_path)
  last = assert_one_line_error(*train(tmp_path, [], model, data), "error: config.peft.method: the workdir")
  assert "peft.method='full', this config has 'lora'; use a new --workdir" in last
  assert_one_line_error(*train(tmp_path, ["--config.peft.method=full", "--config.peft.lora.rank=8"], model, data),
                        f"error: config.peft.lora.rank: the workdir {tmp_path} holds a run with peft.lora.rank=4, "
                        "this config has 8; use a new --workdir")
  assert snapshot(tmp_path) == before


def test_checkpoint_of_another_model_shape_is_refused_untouched(tmp_path):
  """The model folder at model.path was replaced by another-shaped one (head_dim 32, not 16)."""
  from hf_tiny import save_hf_model
  from train_helpers import write_instruction_data
  model, data = str(tmp_path / "model"), write_instruction_data(str(tmp_path / "train.jsonl"), n=16)
  save_hf_model("llama_untied", model)
  workdir = tmp_path / "run"
  out, err, rc = train(workdir, ["--config.train.steps=1", "--config.train.batch_size=2"], model, data)
  assert rc == 0, err[-2000:]
  shutil.rmtree(model)
  save_hf_model("llama3_rope", model)
  before = snapshot(workdir)
  last = assert_one_line_error(*train(workdir, ["--config.train.steps=2", "--config.train.batch_size=2"], model, data),
                               f"error: {workdir}/checkpoints/1: checkpoint param ")
  assert "but the model needs" in last and "nothing was overwritten" in last
  assert snapshot(workdir) == before


def test_bad_data_and_model_paths_are_one_line(tiny_setup, tmp_path):
  model, data = tiny_setup
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": \n')
  assert_one_line_error(*train(tmp_path / "a", [], model, str(bad)), f"error: {bad}:3: invalid JSON")
  assert_one_line_error(*train(tmp_path / "b", [], str(tmp_path / "no_model"), data),
                        f"error: config.model.path: model path '{tmp_path / 'no_model'}' is neither")
  assert not os.path.exists(tmp_path / "b"), "the workdir was created"
  assert_one_line_error(*train(tmp_path / "c", [], str(tmp_path), data),
                        f"error: config.model.path: model folder '{tmp_path}' has no config.json")
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  assert_one_line_error(*train(tmp_path / "d", [], model, str(empty)), f"error: {empty}: no records")
  assert_one_line_error(*train(tmp_path / "e", [f"--config.data.eval={empty}"], model, data),
                        f"error: {empty}: no records")
  assert not any(os.path.exists(tmp_path / name) for name in "abcde"), "a workdir was created"


def test_expert_axis_must_divide_the_experts(tmp_path):
  from train_helpers import make_tiny_setup
  model, data = make_tiny_setup(str(tmp_path / "setup"), "mixtral")  # 4 experts per layer
  assert_one_line_error(*train(tmp_path / "run", ["--config.mesh.data=1", "--config.mesh.expert=8",
                                                  "--config.train.batch_size=8"], model, data, devices=8),
                        f"error: config.mesh.expert: {model} has 4 experts per layer, which do not split over 8 devices")
  assert not os.path.exists(tmp_path / "run"), "the workdir was created"


def test_attention_without_soft_caps_is_refused_for_gemma2(tmp_path):
  """Only the blocked attention soft-caps scores: asking a Gemma 2 run for another is one line."""
  from train_helpers import make_tiny_setup
  model, data = make_tiny_setup(str(tmp_path / "setup"), "gemma2")
  assert_one_line_error(*train(tmp_path / "run", ["--config.model.attention=xla"], model, data),
                        "error: config.model.attention: xla cannot soft-cap attention scores")
  assert not os.path.exists(tmp_path / "run"), "the workdir was created"


def test_relative_paths_are_stored_absolute(tiny_setup, tmp_path, monkeypatch):
  """Relative model and data paths go into config.json absolute: export.py works from any directory,
  and the same relative command resumes; a workdir written with relative paths still matches."""
  model, data = tiny_setup
  os.symlink(model, tmp_path / "model")
  shutil.copy(data, tmp_path / "train.jsonl")
  flags = ["--config.train.steps=1", "--config.train.batch_size=2"]
  out, err, rc = train("run", flags, "model", "train.jsonl", cwd=tmp_path)
  assert rc == 0, err[-2000:]
  stored = json.load(open(tmp_path / "run" / "config.json"))
  assert (stored["model"]["path"], stored["data"]["train"]) == (str(tmp_path / "model"), str(tmp_path / "train.jsonl"))
  export = subprocess.run([sys.executable, os.path.join(HERE, "..", "scripts", "export.py"), "--workdir",
                           str(tmp_path / "run"), "--out", str(tmp_path / "adapter"), "--format", "peft"],
                          capture_output=True, text=True, cwd=HERE, timeout=300, env=without_torch())
  assert export.returncode == 0, export.stderr[-2000:]
  out, err, rc = train("run", ["--config.train.steps=2", "--config.train.batch_size=2"], "model", "train.jsonl",
                       cwd=tmp_path)
  assert rc == 0, err[-2000:]
  assert [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
  stored["model"]["path"], stored["data"]["train"] = "model", "train.jsonl"  # as an older version wrote them
  (tmp_path / "run" / "config.json").write_text(json.dumps(stored))
  import ml_collections
  from jaxtune import trainer
  monkeypatch.chdir(tmp_path)
  trainer.check_workdir(str(tmp_path / "run"), trainer.with_absolute_paths(ml_collections.ConfigDict(stored)))
