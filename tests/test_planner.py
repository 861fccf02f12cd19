"""The on-paper planner: exact parameter counts (vs transformers/peft on the meta device) and a
memory breakdown computed by hand."""

import pytest

from jaxtune import planner
from jaxtune.models.config import ModelConfig

KNOWN_COUNTS = {
    "llama2-7b": 6_738_415_616,
    "llama3-8b": 8_030_261_248,
    "llama3-70b": 70_553_706_496,
    "smollm2-135m": 134_515_008,
    "mixtral-8x7b": 46_702_792_704,
}


def _meta_hf_model(cfg: ModelConfig):
  """The same shape as a transformers Llama, built on the meta device (no memory allocated)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  shape = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
               intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
               num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
               tie_word_embeddings=cfg.tie_word_embeddings)
  if cfg.num_experts:
    hf = transformers.MixtralConfig(**shape, num_local_experts=cfg.num_experts,
                                    num_experts_per_tok=cfg.num_experts_per_tok)
  else:
    hf = transformers.LlamaConfig(**shape)
  with torch.device("meta"):
    return transformers.AutoModelForCausalLM.from_config(hf)


ALL_SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("name", sorted(KNOWN_COUNTS))
def test_param_counts_exact(name):
  cfg = planner.PRESETS[name]
  assert planner.count_params(cfg) == KNOWN_COUNTS[name]
  model = _meta_hf_model(cfg)
  assert sum(p.numel() for p in model.parameters()) == KNOWN_COUNTS[name]


@pytest.mark.parametrize("name,rank,targets,peft_targets,expected", [
    ("llama2-7b", 8, ".*(q_proj|v_proj)", ["q_proj", "v_proj"], 4_194_304),
    ("llama3-70b", 16, ".*_proj", ALL_SEVEN, 207_093_760),
])
def test_lora_counts_match_peft(name, rank, targets, peft_targets, expected):
  peft = pytest.importorskip("peft")
  cfg = planner.PRESETS[name]
  assert planner.count_lora_params(cfg, rank, targets) == expected
  model = peft.get_peft_model(_meta_hf_model(cfg),
                              peft.LoraConfig(r=rank, target_modules=peft_targets))
  trainable, total = model.get_nb_trainable_parameters()
  assert trainable == expected
  mesh = planner.Mesh(fsdp=8)
  p = planner.plan(cfg, mesh, "v5p", 8, 128, lora_rank=rank, lora_targets=targets)
  assert (p.trainable_params, p.total_params) == (trainable, total)


TINY = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=16)


@pytest.mark.parametrize("method", ["dora", "ia3", "prefix", "prompt"])
def test_other_method_counts_match_peft(method):
  # llama3-8b is grouped-query (8 kv heads of 32): a prefix holds kv_size-wide keys/values, as peft's.
  peft = pytest.importorskip("peft")
  cfg = planner.PRESETS["llama3-8b"]
  config = {"dora": lambda: peft.LoraConfig(r=16, target_modules=ALL_SEVEN, use_dora=True),
            "ia3": lambda: peft.IA3Config(),  # k_proj, v_proj, down_proj (input side): ours too
            "prefix": lambda: peft.PrefixTuningConfig(num_virtual_tokens=16, task_type="CAUSAL_LM"),
            "prompt": lambda: peft.PromptTuningConfig(num_virtual_tokens=16, task_type="CAUSAL_LM")}[method]()
  trainable, total = peft.get_peft_model(_meta_hf_model(cfg), config).get_nb_trainable_parameters()
  p = planner.plan(cfg, planner.Mesh(fsdp=8), "v5p", 8, 128, method=method, lora_rank=16, peft_length=16)
  assert (p.trainable_params, p.total_params) == (trainable, total)
  assert p.trainable_params < p.total_params / 100 and p.peft_params > 0


QV = ".*(q_proj|v_proj)"


def saved_at(seq_len):
  """Saved activation elements per layer and token (see test_memory_breakdown_by_hand)."""
  return 4 * 64 + 2 * 64 + 2 * 32 + 4 * 128 + 4 * seq_len


def test_memory_breakdown_by_hand():
  # Full fine-tuning, fp32 params, bf16 compute, batch 4 x 8 on fsdp=2 (v5e, 16 GiB).
  p = planner.plan(TINY, planner.Mesh(fsdp=2), "v5e", 4, 8, method="full",
                   param_dtype="float32", compute_dtype="bfloat16", remat=False)
  per_layer = 64 * 64 + 2 * (64 * 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64  # q, k+v, o, mlp, norms
  n = 2 * per_layer + 2 * 256 * 64 + 64                                  # + embed, lm_head, norm
  norms = 2 * 2 * 64 + 64                  # replicated; every other leaf has a 64-wide embed dim
  per_chip = (n - norms) / 2 + norms       # split over fsdp=2
  assert p.total_params == p.trainable_params == n == 106_816
  assert p.params == p.gradients == per_chip * 4 == 214_272
  assert p.optimizer == per_chip * 8
  assert p.gathered_weights == 2 * per_layer * 4     # two whole layers after the gather, fp32
  assert p.peft_params == 0
  tokens = 4 // 2 * 8                                # per chip
  saved = 4 * 64 + 2 * 64 + 2 * 32 + 4 * 128 + 4 * 8  # residual/normed, q,k,v,attn out, mlp, probs
  logits = tokens * 256 * 4 * 2
  assert p.activations_no_remat == tokens * 2 * saved * 2 + logits == 96_256
  assert p.activations_remat == tokens * (2 * 64 * 2 + saved * 2) + logits == 68_608
  assert p.activations == p.activations_no_remat
  assert p.total == 214_272 + 295_936 + 214_272 + 428_544 + 96_256
  assert p.hbm == 16 * 2**30 and p.fits
  # Longer rows: the fused loss holds logits for one chunk of 128 positions per row, not all 512.
  long = planner.plan(TINY, planner.Mesh(fsdp=2), "v5e", 4, 512, method="full",
                      param_dtype="float32", compute_dtype="bfloat16", remat=False)
  assert long.activations_no_remat == 2 * 512 * 2 * saved_at(512) * 2 + 2 * 128 * 256 * 4 * 2
  # A trained head (full) is summed over at most 4 chunks: 2048 positions -> 512 per chunk; LoRA keeps 128.
  for method, chunk in (("full", 512), ("lora", 128)):
    p2k = planner.plan(TINY, planner.Mesh(fsdp=2), "v5e", 4, 2048, method=method,
                       param_dtype="float32", compute_dtype="bfloat16", remat=False)
    assert p2k.activations_no_remat == 2 * 2048 * 2 * saved_at(2048) * 2 + 2 * chunk * 256 * 4 * 2, method


def test_tensor_axis_and_lora_sharding():
  n, norms = 106_816, 320
  p = planner.plan(TINY, planner.Mesh(fsdp=2, tensor=2), "v4", 4, 8, lora_rank=4, lora_targets=QV)
  assert p.params == ((n - norms) / 4 + norms) * 2   # bf16; embed over fsdp, heads/mlp/vocab over tensor
  p = planner.plan(TINY, planner.Mesh(fsdp=2), "v4", 4, 8, lora_rank=4, lora_targets=QV)
  assert p.trainable_params == 2 * (64 * 4 + 4 * 64) + 2 * (64 * 4 + 4 * 32)  # q and v, 2 layers
  # A (L, embed, r) splits over fsdp; B (L, r, heads) has no fsdp dim: replicated with tensor=1.
  per_chip = 2 * 64 * 4 / 2 + 2 * 4 * 64 + 2 * 64 * 4 / 2 + 2 * 4 * 32
  assert p.peft_params == p.gradients == per_chip * 2 and p.optimizer == per_chip * 8


def test_adapter_dora_and_prefix_by_hand():
  # Adapters (size 8) after attention and after the MLP: down 64x8 + 8, up 8x64 + 64, per layer.
  p = planner.plan(TINY, planner.Mesh(fsdp=2), "v4", 4, 8, method="adapter", adapter_size=8)
  assert p.trainable_params == 2 * 2 * (64 * 8 + 8 + 8 * 64 + 64)
  assert p.dora_norms == 0
  # DoRA on all seven: one layer's kernels in float32, split over tensor; magnitudes train with A and B.
  lora = planner.plan(TINY, planner.Mesh(fsdp=2, tensor=2), "v4", 4, 8, method="lora", lora_rank=4)
  dora = planner.plan(TINY, planner.Mesh(fsdp=2, tensor=2), "v4", 4, 8, method="dora", lora_rank=4)
  kernels = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128
  assert lora.dora_norms == 0 and dora.dora_norms == kernels * 4 / 2
  assert dora.trainable_params == lora.trainable_params + 2 * (64 + 2 * 32 + 64 + 2 * 128 + 64)
  assert dora.total == lora.total + dora.dora_norms + (dora.peft_params - lora.peft_params) * 6
  # A prefix (or soft prompt) of 4 widens every layer's attention probabilities to 8 + 4 keys.
  for method in ("prefix", "prompt"):
    p = planner.plan(TINY, planner.Mesh(fsdp=2), "v5e", 4, 8, method=method, peft_length=4,
                     param_dtype="float32", compute_dtype="bfloat16", remat=False)
    assert p.activations_no_remat == 2 * 8 * 2 * saved_at(8 + 4) * 2 + 2 * 8 * 256 * 4 * 2, method


def test_nf4_base_by_hand():
  """QLoRA: the layers' kernels at 0.5 + 4/64 bytes a weight (here bf16 params: 2), the embeddings,
  norms and LM head as they were; one layer's kernels dequantized in compute dtype."""
  kernels = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128   # one layer's seven
  n, norms = 106_816, 320
  plain = planner.plan(TINY, planner.Mesh(fsdp=2), "v4", 4, 8, lora_rank=4)
  nf4 = planner.plan(TINY, planner.Mesh(fsdp=2), "v4", 4, 8, lora_rank=4, quantize="nf4")
  assert plain.params == ((n - norms) / 2 + norms) * 2 and plain.dequantized == 0
  assert nf4.params == plain.params - 2 * kernels / 2 * (2 - 0.5625)   # 2 layers over fsdp=2
  assert nf4.gathered_weights == plain.gathered_weights - 2 * kernels * (2 - 0.5625)
  assert nf4.dequantized == kernels * 2
  assert nf4.total_params == plain.total_params and nf4.trainable_params == plain.trainable_params
  double = planner.plan(TINY, planner.Mesh(fsdp=2), "v4", 4, 8, lora_rank=4, quantize="nf4_double_quant")
  assert double.params == plain.params - 2 * kernels / 2 * (2 - (0.5 + (1 + 4 / 256) / 64))  # 4.127 bits
  # 70B: LoRA on a v6e-8 passes the 90% line; with an NF4 base it takes about half the chip
  cfg = planner.PRESETS["llama3-70b"]
  gen, chips = planner.slice_chips("v6e-8")
  runs = {q: planner.plan(cfg, planner.resolve_mesh(chips), gen, 8, 4096, lora_rank=16, quantize=q) for q in ("", "nf4")}
  assert not runs[""].fits and runs["nf4"].fits and runs["nf4"].total < 0.6 * runs["nf4"].hbm
  with pytest.raises(ValueError, match="full fine-tuning"):
    planner.plan(TINY, planner.Mesh(), "v4", 4, 8, method="full", quantize="nf4")


def test_mixtral_activations_by_hand():
  """An MoE layer saves k copies of each token, the router's probabilities and the chosen experts'
  MLP arrays; LoRA's default targets find attention only (experts frozen)."""
  cfg = planner.PRESETS["mixtral-8x7b"]
  p = planner.plan(cfg, planner.Mesh(fsdp=16), "v5p", 16, 4096, lora_rank=16, remat=False, fused_attention=True)
  D, q, kv, k, F, E = 4096, 4096, 1024, 2, 14336, 8
  per_token = 4 * D + k * D + E + 2 * q + 2 * kv + 4 * k * F
  logits = 128 * 32000 * 4 * 2  # one row per chip, one 128-position chunk of float32 logits and gradient
  assert p.activations_no_remat == 4096 * 32 * per_token * 2 + logits
  assert p.trainable_params == 32 * 16 * ((D + q) + 2 * (D + kv) + (q + D))  # q, k, v, o
  assert p.fits


def test_mixtral_expert_axis_by_hand():
  """Mixtral-8x7B on a v5p-64 (32 chips) as fsdp=4 x expert=8: each chip holds one expert's weights
  split four ways; attention, embeddings and LM head are split over fsdp only (replicated over
  expert, as over data), the router and norms everywhere; the batch splits over all 32."""
  cfg = planner.PRESETS["mixtral-8x7b"]
  mesh = planner.resolve_mesh(32, fsdp=4, expert=-1)
  assert mesh == planner.Mesh(fsdp=4, expert=8) and mesh.rows == 32
  p = planner.plan(cfg, mesh, "v5p", 32, 4096, lora_rank=16)
  L, D, F, E, V, q, kv = 32, 4096, 14336, 8, 32000, 4096, 1024
  experts = L * E * 3 * D * F
  split_over_fsdp = 2 * V * D + L * (2 * D * q + 2 * D * kv)  # embeddings, LM head, q/k/v/o
  everywhere = L * D * E + (2 * L + 1) * D                   # router, norms
  assert p.params == (experts / 32 + split_over_fsdp / 4 + everywhere) * 2  # bfloat16
  # two layers gathered over fsdp at a time; the experts stay split over expert
  assert p.gathered_weights == 2 * (E * 3 * D * F / 8 + 2 * D * q + 2 * D * kv + D * E + 2 * D) * 2
  no_expert_axis = planner.plan(cfg, planner.Mesh(fsdp=32), "v5p", 32, 4096, lora_rank=16)
  assert no_expert_axis.params < p.params  # fsdp=32 splits attention 32 ways too; experts the same
  assert planner.main(["--preset", "mixtral-8x7b", "--slice", "v5p-64", "--mesh", "fsdp=4,expert=-1"]) == 0


def test_70b_lora_fits_v5p64_but_full_does_not_fit_v5e16():
  cfg = planner.PRESETS["llama3-70b"]
  gen, chips = planner.slice_chips("v5p-64")
  assert (gen, chips) == ("v5p", 32)
  mesh = planner.resolve_mesh(chips, fsdp=-1)
  lora = planner.plan(cfg, mesh, gen, 32, 4096, lora_rank=16)
  assert lora.fits and lora.total < 25 * 2**30
  assert lora.activations_no_remat > lora.hbm      # without remat the activations alone overflow
  full = planner.plan(cfg, planner.resolve_mesh(16), "v5e", 16, 2048, method="full")
  assert not full.fits and full.optimizer == pytest.approx(70_553_706_496 * 8 / 16, rel=1e-3)


def test_slices_and_meshes():
  assert planner.slice_chips("v4-32") == ("v4", 16)
  assert planner.slice_chips("v5litepod-16") == ("v5e", 16)
  assert planner.slice_chips("v6e-8") == ("v6e", 8)
  assert planner.resolve_mesh(32, data=2, fsdp=-1, tensor=4) == planner.Mesh(2, 4, 4)
  with pytest.raises(ValueError, match="v7-8"):
    planner.slice_chips("v7-8")
  with pytest.raises(ValueError, match="not divisible"):
    planner.resolve_mesh(32, fsdp=-1, tensor=3)
  with pytest.raises(ValueError, match="batch_size 3"):
    planner.plan(TINY, planner.Mesh(fsdp=2), "v4", 3, 8)


def test_cli(capsys):
  assert planner.main(["--preset", "smollm2-135m", "--chip", "v6e", "--mesh", "fsdp=4",
                       "--method", "full", "--batch", "8", "--seq", "512"]) == 0
  out = capsys.readouterr().out
  assert "total params 134,515,008   trainable 134,515,008" in out
  assert "mesh {'data': 1, 'fsdp': 4, 'tensor': 1, 'expert': 1}" in out and "fits: yes" in out
  assert "DoRA weight norms" not in out  # shown for DoRA only
  assert planner.main(["--preset", "llama3-70b", "--slice", "v5p-64", "--mesh", "fsdp=-1,tensor=3"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "not divisible by the other mesh axes' product 3" in err[0]
  assert planner.main(["--preset", "smollm2-135m", "--chip", "v6e", "--mesh", "fsdp=4", "--method", "dora",
                       "--targets", ".*(q_proj|v_proj)"]) == 0
  assert "DoRA weight norms" in capsys.readouterr().out
  assert planner.main(["--preset", "smollm2-135m", "--chip", "v6e", "--method", "lora", "--targets", "q_proj"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "peft.lora.targets='q_proj' matches no linear layer" in err[0]


def test_lora_on_experts_counts_match_peft():
  """Mixtral-8x7B, LoRA r=16 on q/v and on every expert's gate_up_proj and down_proj (peft's
  target_parameters): 8 experts x 32 layers x 16 x ((4096 + 2 x 14336) + (14336 + 4096)) more."""
  peft = pytest.importorskip("peft")
  cfg = planner.PRESETS["mixtral-8x7b"]
  model = peft.get_peft_model(_meta_hf_model(cfg), peft.LoraConfig(
      r=16, target_modules=["q_proj", "v_proj"], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]))
  trainable, total = model.get_nb_trainable_parameters()
  attention = 32 * 16 * ((4096 + 4096) + (4096 + 1024))
  assert trainable == attention + 32 * 8 * 16 * ((4096 + 2 * 14336) + (14336 + 4096)) == 216_530_944
  p = planner.plan(cfg, planner.Mesh(fsdp=8), "v5p", 8, 128, lora_rank=16, lora_targets=".*(q_proj|v_proj)",
                   expert_targets="gate_up_proj|down_proj")
  assert (p.trainable_params, p.total_params) == (trainable, total)
