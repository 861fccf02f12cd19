"""The training run: config -> mesh -> model (sharded) -> PEFT -> partition -> optimizer -> jit(step) loop.

Resumes from the newest complete checkpoint in the workdir by itself.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import tqdm
from etils import epath

from jaxtune import checkpoint, objectives, profiling, sharding
from jaxtune.config_checks import ConfigError, field_map
from jaxtune.data import pipeline
from jaxtune.metrics_log import MetricsLog
from jaxtune.models import llama, loading, quantization
from jaxtune.optimizer import build_optimizer, learning_rate_schedule
from jaxtune.peft import methods, partition
from jaxtune.train_step import StepSpec, eval_step, lm_loss_sums, train_step

# Keys whose change makes an existing workdir's checkpoints meaningless.
RUN_IDENTITY_KEYS = ("model.path", "objective", "peft", "data.train", "data.format", "data.seq_len",
                     "data.packing", "train.batch_size", "train.seed")


def _get(tree: dict, dotted: str):
  for part in dotted.split("."):
    tree = tree.get(part, {}) if isinstance(tree, dict) else None
  return tree


def _set(tree: dict, dotted: str, value) -> None:
  *parents, leaf = dotted.split(".")
  for part in parents:
    tree = tree.setdefault(part, {})
  tree[leaf] = value


PATH_KEYS = ("model.path", "model.tokenizer", "data.train", "data.eval")


def absolute_if_local(path: str) -> str:
  """A relative path that exists here, made absolute; anything else (a gs:// path, a datasets name) as is."""
  local = os.path.expanduser(path)
  if path and "://" not in path and not os.path.isabs(local) and os.path.exists(local):
    return os.path.abspath(local)
  return path


def _absolute_paths(tree: dict) -> dict:
  """{dotted key: value made absolute} for the PATH_KEYS a config tree holds."""
  return {key: absolute_if_local(_get(tree, key)) for key in PATH_KEYS if isinstance(_get(tree, key), str)}


def with_absolute_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with its local model and data paths absolute, so that the config.json a run writes
  (which export.py, evaluate.py --adapter and a resumed run read) works from any directory."""
  config = config.copy_and_resolve_references()
  config.update_from_flattened_dict(_absolute_paths(config.to_dict()))
  return config


def check_workdir(workdir: str, config: ml_collections.ConfigDict) -> None:
  """A workdir already holding a run with another identity is an error (nothing is touched)."""
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    return
  old = json.loads(path.read_text())
  for key, path in _absolute_paths(old).items():  # a run from before paths were stored absolute
    _set(old, key, path)
  new = json.loads(config.to_json())
  for key in RUN_IDENTITY_KEYS:
    if _get(old, key) != _get(new, key):
      key = _first_difference(old, new, key)
      raise ConfigError(key, f"the workdir {workdir} holds a run with {key}={_get(old, key)!r}, "
                        f"this config has {_get(new, key)!r}; use a new --workdir")


def _first_difference(old: dict, new: dict, key: str) -> str:
  """The dotted key of the first leaf under `key` (a differing key of two configs) that differs."""
  a, b = _get(old, key), _get(new, key)
  if isinstance(a, dict) and isinstance(b, dict):
    for part in [*b, *(k for k in a if k not in b)]:
      if a.get(part) != b.get(part):
        return _first_difference(old, new, f"{key}.{part}")
  return key


def instruction_template(config: ml_collections.ConfigDict, tokenizer) -> str:
  if config.data.template != "auto":
    return config.data.template
  return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"


def build_model(config: ml_collections.ConfigDict, mesh) -> dict[str, Any]:
  """Loads the base (into its shardings), adds PEFT leaves, splits trainable/frozen."""
  param_dtype = jnp.dtype(config.precision.param_dtype)
  model_cfg = dataclasses.replace(loading.model_config_of(config.model.path), attention=config.model.attention,
                                  layer_loop=config.model.layer_loop, moe_dispatch=config.model.moe_dispatch)
  base_shapes = loading.flatten(llama.param_shapes(model_cfg), is_leaf=lambda x: isinstance(x, tuple))
  if config.model.quantize:
    base_shapes = quantization.quantize_shapes(base_shapes, config.model.quantize)
  params = loading.load_model(config.model.path, param_dtype, quantize=config.model.quantize,
                              shardings=sharding.param_shardings(base_shapes, mesh))[1]
  peft_rng = jax.random.fold_in(jax.random.PRNGKey(config.train.seed), 1)
  params = methods.add_peft(params, model_cfg, config.peft, peft_rng, param_dtype)
  params = objectives.add_params(config, params, model_cfg, param_dtype)
  trainable, frozen = partition.split(params, config.peft.method)
  trainable = sharding.put_global(trainable, sharding.param_shardings(trainable, mesh))
  frozen = sharding.put_global(frozen, sharding.param_shardings(frozen, mesh))
  return dict(model_cfg=model_cfg, trainable=trainable, frozen=frozen,
              peft=methods.peft_runtime(config.peft))


def load_data(config: ml_collections.ConfigDict, tokenizer):
  """(train PackedDataset, eval PackedDataset or None)."""
  mapping = field_map(config.data.field_map)
  train_records, eval_records = pipeline.load_splits(
      config.data.train, config.data.eval or None, eval_fraction=config.data.eval_fraction,
      seed=config.train.seed, field_map=mapping, lenient=config.data.lenient)
  kwargs = dict(field_map=mapping, template=instruction_template(config, tokenizer),
                train_on_prompt=config.data.train_on_prompt, add_eos=config.data.format == "text",
                packing=config.data.packing, truncation=config.data.truncation,
                lenient=config.data.lenient, num_proc=config.data.num_proc)
  train = pipeline.build_dataset(train_records, config.data.format, tokenizer, config.data.seq_len, **kwargs)
  evald = None
  if eval_records is not None and len(eval_records):
    evald = pipeline.build_dataset(eval_records, config.data.format, tokenizer, config.data.seq_len, **kwargs)
  return train, evald


def max_targets_per_row(*datasets) -> int:
  """Most weighted positions in any row, rounded up to a multiple of 8 (see StepSpec.max_targets)."""
  keys = ("weights", "chosen_weights", "rejected_weights")  # LM rows; DPO pairs
  most = max((int((d.arrays[k] > 0).sum(axis=1).max()) for d in datasets if d is not None
              for k in keys if k in d.arrays), default=0)
  # GRPO prompts: their rows come later, with at most grpo.max_new_tokens targets
  most = max([most] + [getattr(d, "targets_per_row", 0) for d in datasets if d is not None])
  return -(-most // 8) * 8


def write_json(path: str | epath.Path, obj: Any) -> None:
  """Atomic write (tmp + rename) so a crash never leaves a half-written file."""
  path = epath.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(obj, indent=2))
  tmp.replace(path)


def skipping_nonfinite(trainable, frozen, opt_state, batch, rng, **kwargs):
  """train_step, but a non-finite loss or gradient leaves the params and optimizer state as they were."""
  new_trainable, new_opt_state, metrics = train_step(trainable, frozen, opt_state, batch, rng, **kwargs)
  def keep_if_finite(new, old):
    return jax.tree.map(lambda n, o: jnp.where(metrics["finite"] > 0, n, o), new, old)
  return keep_if_finite(new_trainable, trainable), keep_if_finite(new_opt_state, opt_state), metrics


def make_step_fns(config, spec: StepSpec, optimizer, shardings: dict[str, Any], loss_sums=lm_loss_sums):
  """jit(train_step) and jit(eval_step) with explicit in/out shardings and donation."""
  tr, fr, opt, batch, rep = (shardings[k] for k in ("trainable", "frozen", "opt_state", "batch", "replicated"))
  fn = skipping_nonfinite if config.train.skip_nonfinite else train_step
  step = jax.jit(functools.partial(fn, spec=spec, optimizer=optimizer, loss_sums=loss_sums),
                 in_shardings=(tr, fr, opt, batch, rep), out_shardings=(tr, opt, rep),
                 donate_argnums=(0, 2))
  evaluate = jax.jit(functools.partial(eval_step, spec=spec, loss_sums=loss_sums),
                     in_shardings=(tr, fr, batch), out_shardings=rep)
  return step, evaluate


def opt_state_shardings(optimizer, trainable, trainable_shardings, mesh):
  """Params-shaped optimizer leaves follow their param; every other leaf (counts) is replicated. A
  partitioned optimizer (Muon's) holds a MaskedNode where a param belongs to its other part."""
  import optax
  abstract = jax.eval_shape(optimizer.init, trainable)
  return optax.tree_map_params(optimizer, lambda x, s: x if isinstance(x, optax.MaskedNode) else s, abstract,
                               trainable_shardings, transform_non_params=lambda _: sharding.replicated(mesh),
                               is_leaf=lambda x: isinstance(x, optax.MaskedNode))


def evaluate_dataset(evaluate, trainable, frozen, dataset, batch_size, mesh, max_batches=0) -> dict[str, float]:
  total = weight = 0.0
  extra = {}  # objective metrics (per-weight means in each batch), weighted over batches
  for i, local in enumerate(pipeline.eval_batches(dataset, batch_size, jax.process_index(), jax.process_count())):
    if max_batches and i >= max_batches:
      break
    s, w, metrics = evaluate(trainable, frozen, sharding.global_batch(local, mesh))
    total, weight = total + float(s), weight + float(w)
    for k, v in metrics.items():
      extra[f"eval_{k}"] = extra.get(f"eval_{k}", 0.0) + float(v) * float(w)
  extra = {k: v / max(weight, 1.0) for k, v in extra.items()}
  return {"eval_loss": total / max(weight, 1.0), "eval_tokens": weight, **extra}


@dataclasses.dataclass
class Run:
  """Everything a training loop needs, built from a config (see `setup`)."""

  config: ml_collections.ConfigDict
  mesh: Any
  train_data: Any
  eval_data: Any
  trainable: dict
  frozen: dict
  opt_state: Any
  rng: jax.Array
  schedule: Any
  step_fn: Any
  eval_fn: Any
  counts: dict
  spec: StepSpec = None
  tokenizer: Any = None


def use_compilation_cache(path: str) -> None:
  """JAX's persistent compilation cache in `path` (local or gs://): a rerun of the same programs,
  e.g. after a preemption, loads them instead of compiling (those that took JAX's
  jax_persistent_cache_min_compile_time_secs, 1 s by default, to compile)."""
  from jax.experimental.compilation_cache import compilation_cache
  path = path if "://" in path else os.path.expanduser(path)
  if jax.config.jax_compilation_cache_dir != path:
    compilation_cache.reset_cache()  # one set up by an earlier run in this process
    compilation_cache.set_cache_dir(path)


def setup(config: ml_collections.ConfigDict, workdir: str, loss_sums=None, load=load_data) -> Run:
  """Validates against the mesh and workdir, loads data (`load(config, tokenizer)`) and model, builds
  the jitted step for `loss_sums` (default: config.objective's)."""
  loss_sums = loss_sums or objectives.objective_loss_sums(config)
  is_main = jax.process_index() == 0
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, expert=config.mesh.expert,
                            dcn_data=config.mesh.dcn_data)
  data_axes = "*".join(f"mesh.{axis}" for axis in sharding.BATCH_AXES)
  if config.train.batch_size % sharding.batch_divisor(mesh):
    raise ConfigError("train.batch_size", f"{config.train.batch_size} is not divisible by the data axes "
                      f"({data_axes} = {sharding.batch_divisor(mesh)})")
  if (config.train.batch_size // config.train.grad_accum) % sharding.batch_divisor(mesh):
    raise ConfigError("train.grad_accum", f"each micro-batch must still divide over {data_axes}")
  if config.model.attention == "cudnn" and jax.default_backend() != "gpu":
    raise ConfigError("model.attention", f"cudnn needs a GPU; this run's devices are {jax.default_backend()}")
  if problem := loading.model_path_problem(config.model.path):
    raise ConfigError("model.path", problem)
  model_cfg = loading.model_config_of(config.model.path)
  if config.model.attention in ("xla", "cudnn", "splash") and model_cfg.attn_logit_softcap:
    raise ConfigError("model.attention", f"{config.model.attention} cannot soft-cap attention scores, which this "
                      "model does (Gemma 2): use auto or blocked")
  if model_cfg.num_experts % mesh.shape["expert"]:
    raise ConfigError("mesh.expert", f"{config.model.path} has {model_cfg.num_experts} experts per layer, "
                      f"which do not split over {mesh.shape['expert']} devices")
  if config.train.router_aux_loss_coef and not model_cfg.num_experts:
    raise ConfigError("train.router_aux_loss_coef", f"{config.model.path} has no mixture-of-experts layers")
  if config.peft.method in partition.LORA_METHODS and config.peft.lora.expert_targets and not model_cfg.num_experts:
    raise ConfigError("peft.lora.expert_targets", f"{config.model.path} has no mixture-of-experts layers")
  check_workdir(workdir, config)  # the config errors come before anything touches the workdir
  jax.set_mesh(mesh)  # the run's mesh, seen while tracing (model.attention=splash shards its kernel by it)
  if config.model.attention == "splash" and jax.default_backend() != "tpu" and is_main:
    print("warning: model.attention=splash off a TPU runs the kernel in Pallas' interpreter (slow)", flush=True)
  if config.train.compilation_cache:
    use_compilation_cache(config.train.compilation_cache)
  tokenizer = loading.load_tokenizer(config.model.tokenizer or config.model.path)
  train_data, eval_data = load(config, tokenizer)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # local or gs://; after the data's errors
  if is_main:
    processes = train_data.stats.processes
    tokenized = f" (tokenized in {processes} processes)" if processes > 1 else ""
    print(f"data: train {train_data.stats.summary()}{tokenized}", flush=True)
  model = build_model(config, mesh)
  trainable, frozen = model["trainable"], model["frozen"]
  counts = {"trainable_params": partition.count(trainable),
            "total_params": partition.count(trainable) + partition.count(frozen)}
  if is_main:
    print(f"params: trainable {counts['trainable_params']:,} / total {counts['total_params']:,} "
          f"({100 * counts['trainable_params'] / counts['total_params']:.3f}%)", flush=True)

  steps = config.train.steps
  optimizer = build_optimizer(config.optimizer, steps, trainable.keys())
  tr_sh = sharding.param_shardings(trainable, mesh)
  shardings = dict(trainable=tr_sh, frozen=sharding.param_shardings(frozen, mesh),
                   batch=sharding.batch_sharding(mesh), replicated=sharding.replicated(mesh))
  shardings["opt_state"] = opt_state_shardings(optimizer, trainable, tr_sh, mesh)
  opt_state = jax.jit(optimizer.init, out_shardings=shardings["opt_state"])(trainable)
  rng = sharding.put_global(jax.random.fold_in(jax.random.PRNGKey(config.train.seed), 2), shardings["replicated"])
  spec = StepSpec(model=model["model_cfg"], peft=model["peft"], compute_dtype=config.precision.compute_dtype,
                  remat=config.train.remat_policy if config.train.remat else "", grad_accum=config.train.grad_accum,
                  max_targets=max_targets_per_row(train_data, eval_data),
                  router_aux_loss_coef=config.train.router_aux_loss_coef)
  step_fn, eval_fn = make_step_fns(config, spec, optimizer, shardings, loss_sums)
  train_data, eval_data = objectives.prepare_data(config, (train_data, eval_data), trainable, frozen, spec, mesh)
  return Run(config=config, mesh=mesh, train_data=train_data, eval_data=eval_data, trainable=trainable,
             frozen=frozen, opt_state=opt_state, rng=rng,
             schedule=learning_rate_schedule(config.optimizer, steps), step_fn=step_fn, eval_fn=eval_fn,
             counts=counts, spec=spec, tokenizer=tokenizer)


class TrainingInterrupted(Exception):
  """SIGTERM/SIGINT stopped training after a checkpoint at `step` was saved; rerunning resumes."""

  def __init__(self, signum: int, step: int, newest: str | None):
    saved = f"checkpoint {newest}" if newest else "no checkpoint yet"
    super().__init__(f"{signal.Signals(signum).name}: stopped after step {step} ({saved}); "
                     "run the same command again to resume")
    self.exit_code = 128 + signum  # the shell's "ended by this signal": the run has not finished


class StopSignals:
  """While active, SIGTERM (what a TPU preemption sends) and SIGINT (Ctrl-C) only note the signal;
  the loop then saves and stops at the next step boundary. A second signal gets the previous
  handler back (Ctrl-C twice aborts at once)."""

  def __init__(self):
    self.signum, self._previous = None, {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # Python sets handlers only there
      self._previous = {s: signal.signal(s, self._note) for s in (signal.SIGTERM, signal.SIGINT)}
    return self

  def _note(self, signum, frame):
    del frame  # no printing here: the main thread may be inside a write to the same stream
    self.signum = signum
    self.__exit__()

  def __exit__(self, *exc):
    for s, previous in self._previous.items():
      signal.signal(s, previous)
    self._previous = {}

  def requested(self) -> bool:
    """Whether any process got a signal: all processes must stop (and save) at the same step."""
    return bool(sharding.all_processes([self.signum is not None]).any())


def step_profiler(config: ml_collections.ConfigDict, workdir: str) -> profiling.StepProfiler:
  """train.profile_steps steps from train.profile_start_step, traced on process 0 (see profiling.py)."""
  return profiling.StepProfiler(os.path.join(workdir, "profile"), config.train.profile_start_step,
                                config.train.profile_steps, enabled=jax.process_index() == 0)


def is_eval_step(step: int, steps: int, eval_every: int) -> bool:
  """Eval after every `eval_every`-th step and after the run's last step (eval_every=0: only then)."""
  return step == steps or bool(eval_every) and step % eval_every == 0


def check_start(start: int, steps: int, workdir: str) -> None:
  """A workdir whose newest checkpoint is past train.steps cannot be trained to train.steps."""
  if start > steps:
    raise ConfigError("train.steps", f"{steps} < {start}, the step of the newest checkpoint in {workdir}: "
                      "raise train.steps or use a new --workdir")


def trim_metrics(workdir: str, step: int) -> None:
  """Drops metrics rows after `step` (and a line torn by a kill): the resumed run logs them again."""
  path = epath.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return
  lines = path.read_text().splitlines()
  keep = []
  for line in lines:
    try:
      if json.loads(line).get("step", 0) <= step:
        keep.append(line)
    except json.JSONDecodeError:
      pass
  if len(keep) != len(lines):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)


def run(config: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None,
        loss_sums=None) -> list[dict]:
  """Trains (or resumes) to config.train.steps; returns the logged metric rows of this invocation.

  Raises FloatingPointError at a non-finite step (unless train.skip_nonfinite) and
  TrainingInterrupted after SIGTERM/SIGINT, both once the newest good checkpoint is complete.
  """
  if config.objective == "grpo":  # generation between steps: its own loop over the same set-up
    from jaxtune.objectives import grpo
    return grpo.run(config, workdir, stop_after=stop_after)
  with StopSignals() as stop:
    return _train(config, workdir, stop, stop_after, loss_sums)


def _train(config, workdir: str, stop: StopSignals, stop_after: int | None, loss_sums) -> list[dict]:
  r = setup(config, workdir, loss_sums)
  is_main = jax.process_index() == 0
  mesh, steps = r.mesh, config.train.steps
  trainable, frozen, opt_state, rng = r.trainable, r.frozen, r.opt_state, r.rng
  eval_data, eval_fn, step_fn = r.eval_data, r.eval_fn, r.step_fn
  batches = pipeline.BatchIterator(r.train_data, config.train.batch_size, config.train.seed,
                                   jax.process_index(), jax.process_count())
  manager = checkpoint.make_manager(workdir, config.train.keep_checkpoints)
  start = manager.latest_step() or 0  # only complete checkpoints: Orbax renames a save when done
  check_start(start, steps, workdir)
  skipped = 0  # non-finite steps skipped (train.skip_nonfinite), over the whole run
  tokens_seen = 0  # non-padding input tokens of every process, over the whole run (logged steps)
  if start:
    state, meta = checkpoint.restore(manager, start, {"trainable": trainable, "opt_state": opt_state, "rng": rng})
    trainable, opt_state, rng = state["trainable"], state["opt_state"], state["rng"]
    batches.restore(meta["data"])
    skipped = meta.get("skipped_steps", 0)
    tokens_seen = meta.get("tokens_seen", 0)
    if is_main:
      print(f"resumed from {checkpoint.checkpoint_dir(workdir)}/{start}", flush=True)
  if is_main:  # only now: a checkpoint that does not fit has left the workdir untouched
    write_json(os.path.join(workdir, "params.json"), r.counts)
    write_json(os.path.join(workdir, "config.json"), json.loads(config.to_json()))
    trim_metrics(workdir, start)

  saved = start

  def save(step):  # pending steps are fetched by now
    nonlocal saved
    saved = step
    log.flush()  # the rows up to this checkpoint are stored before it (a gs:// log uploads now)
    checkpoint.save(manager, step, {"trainable": trainable, "opt_state": opt_state, "rng": rng},
                    {"data": batches.state(), "skipped_steps": skipped,
                     "tokens_seen": tokens_seen + sum(int(m["input_tokens"]) for _, m in pending)})

  log = MetricsLog(workdir, enabled=is_main)
  # Throughput counts every process's tokens (the step reports the global batch's count), from the end
  # of this invocation's first step (it compiles).
  rows, pending, window_start, checked = [], [], None, start
  last = min(steps, stop_after) if stop_after else steps
  bar = tqdm.tqdm(total=steps, initial=start, desc="train", disable=not is_main, dynamic_ncols=True)
  profiler = step_profiler(config, workdir)
  try:
    for step in range(start + 1, last + 1):
      if stop.requested():
        if saved < step - 1:
          if checked < step - 1:  # only finite steps may be saved
            pending, skipped = _check_finite(pending, checked, skipped, config, manager)
          save(step - 1)
        raise TrainingInterrupted(stop.signum or signal.SIGTERM, step - 1, newest_checkpoint(manager))
      args = (trainable, frozen, opt_state, sharding.global_batch(batches.next(), mesh), jax.random.fold_in(rng, step))
      profiler.before_step(step, lambda: step_fn.lower(*args), (trainable, opt_state))
      trainable, opt_state, metrics = step_fn(*args)
      profiler.after_step(step, metrics)
      pending.append((step, metrics))
      if window_start is None:  # the first step compiles: time from its end
        jax.block_until_ready(metrics)
        window_start = time.perf_counter()
      is_eval = eval_data is not None and is_eval_step(step, steps, config.train.eval_every)
      is_log = step % config.train.log_every == 0 or step == last or is_eval
      is_save = step == last or (config.train.checkpoint_every and step % config.train.checkpoint_every == 0)
      if is_log or is_save:
        pending, skipped = _check_finite(pending, checked, skipped, config, manager)
        checked = step
      if is_log:
        fetched = pending[-1][1]
        elapsed = time.perf_counter() - window_start
        timed = sum(int(m["input_tokens"]) for s, m in pending if s > start + 1)
        tokens_seen += sum(int(m["input_tokens"]) for _, m in pending)
        row = {"step": step, "loss": float(fetched["loss"]), "learning_rate": float(r.schedule(step - 1)),
               "tokens_per_sec": timed / elapsed if elapsed > 0 and timed else 0.0,
               "grad_norm": float(fetched["grad_norm"]), "tokens_seen": tokens_seen}
        row.update({k: float(v) for k, v in fetched.items()
                    if k not in ("loss", "grad_norm", "finite", "tokens", "input_tokens")})
        if config.train.skip_nonfinite:
          row["skipped_steps"] = skipped
        if is_eval:
          row.update(evaluate_dataset(eval_fn, trainable, frozen, eval_data, config.train.batch_size, mesh,
                                      config.train.eval_batches))
        pending, window_start = [], time.perf_counter()  # after the eval: the next window times steps only
        log.write(row)
        rows.append(row)
        bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_sec']:.0f}")
      bar.update(1)
      if is_save:
        save(step)
  finally:  # also on errors and signals: the newest checkpoint is complete before we leave
    profiler.finish()
    bar.close()
    manager.wait_until_finished()
    log.close()
  return rows


def newest_checkpoint(manager) -> str | None:
  """The newest complete checkpoint's folder, or None."""
  step = manager.latest_step()
  return None if step is None else f"{manager.directory}/{step}"


def _check_finite(pending, checked: int, skipped: int, config, manager):
  """Fetches the pending (step, metrics); a non-finite step stops the run unless train.skip_nonfinite
  (then it was not applied, and is counted). Returns (pending on the host, skipped)."""
  fetched = jax.device_get([m for _, m in pending])
  pending = [(s, m) for (s, _), m in zip(pending, fetched)]
  bad = [s for s, m in pending if s > checked and not m["finite"]]
  if bad and not config.train.skip_nonfinite:
    manager.wait_until_finished()
    raise FloatingPointError(
        f"step {bad[0]}: non-finite loss or gradients, training stopped; the newest good checkpoint is "
        f"{newest_checkpoint(manager) or 'none'} (lower optimizer.learning_rate, or set train.skip_nonfinite=True "
        "to skip such batches)")
  return pending, skipped + len(bad)
