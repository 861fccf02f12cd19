"""Packing: rows follow the batch contract, attention never crosses records, loss and gradient unchanged."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hf_tiny
from jaxtune.data import formats
from jaxtune.data.packing import pack, pack_rows
from jaxtune.models import llama
from jaxtune.models.config import ModelConfig

CFG = ModelConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, max_position_embeddings=256)
SEQ_LEN = 128


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
  tok = hf_tiny.save_byte_tokenizer(str(tmp_path_factory.mktemp("tok")))
  rng = np.random.default_rng(0)
  out = []
  for i in range(9):
    words = " ".join("w" * int(rng.integers(1, 6)) for _ in range(int(rng.integers(1, 5))))
    messages = [{"role": "user", "content": f"q{i} {words}"},
                {"role": "assistant", "content": f"a{i} {words[::-1]}"}]
    out.append(formats.encode_chat({"messages": messages}, tok))
  return out


@pytest.fixture(scope="module")
def params():
  return llama.init_params(CFG, jax.random.PRNGKey(0), std=0.2)


@jax.jit
def logits_of(params, batch):
  return llama.forward(params, CFG, batch["inputs"], batch["positions"], batch["segment_ids"])[0]


def weighted_nll(params, batch):
  return jnp.sum(llama.token_nll(logits_of(params, batch), batch["targets"]) * batch["weights"])


def pad_rows(arrays, rows):
  """All-padding rows appended (segment 0, weight 0), so packed and unpacked share one compile."""
  return {k: np.concatenate([v, np.zeros((rows - len(v),) + v.shape[1:], v.dtype)]) for k, v in arrays.items()}


@pytest.fixture(scope="module")
def alone(encoded, params):
  """Each record alone at the start of its own row (built here, not by the packer): its logits."""
  inputs = np.zeros((len(encoded), SEQ_LEN), np.int32)
  for i, e in enumerate(encoded):
    inputs[i, :len(e.ids)] = e.ids
  batch = {"inputs": inputs, "positions": np.broadcast_to(np.arange(SEQ_LEN, dtype=np.int32), inputs.shape),
           "segment_ids": np.ones_like(inputs)}
  logits = np.asarray(logits_of(params, batch))
  return [logits[i, :len(e.ids)] for i, e in enumerate(encoded)]


def test_rows_follow_the_batch_contract(encoded):
  arrays = pack(encoded, SEQ_LEN)
  assert len(arrays["inputs"]) < len(encoded)  # several records share rows
  seen = []
  for r in range(len(arrays["inputs"])):
    seg = arrays["segment_ids"][r]
    assert (arrays["weights"][r][seg == 0] == 0).all() and (arrays["targets"][r][seg == 0] == 0).all()
    for s in range(1, seg.max() + 1):
      cols = np.flatnonzero(seg == s)
      assert (np.diff(cols) == 1).all()  # a record is contiguous
      assert arrays["positions"][r][cols].tolist() == list(range(len(cols)))
      ids = arrays["inputs"][r][cols].tolist()
      e = next(e for e in encoded if e.ids == ids)
      assert arrays["targets"][r][cols].tolist() == ids[1:] + [0]
      assert arrays["weights"][r][cols].tolist() == e.loss_mask[1:] + [0]
      seen.append(ids)
  assert sorted(seen) == sorted(e.ids for e in encoded)
  assert (pack(encoded, SEQ_LEN, packing=False)["segment_ids"].max(axis=1) == 1).all()


def test_best_fit_rows():
  assert pack_rows([5, 3, 4, 1, 2], 6) == [[0, 3], [1], [2, 4]]  # 2 goes to the tightest row that fits
  rows = pack_rows(np.random.default_rng(1).integers(1, 50, 500).tolist(), 64)
  assert sorted(i for row in rows for i in row) == list(range(500))
  with pytest.raises(ValueError, match="rows hold 1..6"):
    pack_rows([7], 6)


def test_packed_logits_equal_each_record_alone(encoded, params, alone):
  arrays = pad_rows(pack(encoded, SEQ_LEN), len(encoded))
  logits = np.asarray(logits_of(params, arrays))
  checked = 0
  for r in range(len(arrays["inputs"])):
    for s in range(1, arrays["segment_ids"][r].max() + 1):
      cols = np.flatnonzero(arrays["segment_ids"][r] == s)
      i = next(i for i, e in enumerate(encoded) if e.ids == arrays["inputs"][r][cols].tolist())
      np.testing.assert_allclose(logits[r, cols], alone[i], atol=2e-5)
      checked += 1
  assert checked == len(encoded)


def test_packed_and_unpacked_give_the_same_loss_and_gradient(encoded, params, alone):
  packed = pad_rows(pack(encoded, SEQ_LEN), len(encoded))
  unpacked = pack(encoded, SEQ_LEN, packing=False)
  loss_and_grad = jax.jit(jax.value_and_grad(weighted_nll))
  loss_p, grad_p = loss_and_grad(params, packed)
  loss_u, grad_u = loss_and_grad(params, unpacked)
  # independent reference: each record's own logits in HF's label-shift convention
  reference = sum(float(np.sum(llama.token_nll(a[None, :-1], np.array([e.ids[1:]]))[0] * np.array(e.loss_mask[1:])))
                  for a, e in zip(alone, encoded))
  count = sum(sum(e.loss_mask[1:]) for e in encoded)
  assert float(packed["weights"].sum()) == float(unpacked["weights"].sum()) == count
  assert abs(float(loss_p) - float(loss_u)) / count < 1e-6  # per-token loss within 1e-6
  assert abs(float(loss_p) - reference) / count < 1e-6
  np.testing.assert_allclose(float(loss_p), float(loss_u), rtol=1e-5)
  flat_p, flat_u = jax.tree.leaves(grad_p), jax.tree.leaves(grad_u)
  assert len(flat_p) == len(flat_u)
  for g_p, g_u in zip(flat_p, flat_u):
    np.testing.assert_allclose(g_p, g_u, rtol=1e-4, atol=1e-5)
  assert max(float(jnp.abs(g).max()) for g in flat_p) > 1e-2  # the gradient is not trivially zero
