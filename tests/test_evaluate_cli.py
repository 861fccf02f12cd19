"""The scripts as users run them: evaluate.py's last-line JSON, generate.py's output, one-line errors."""

import json
import os
import subprocess
import sys

import pytest

import hf_tiny
from jaxtune import evaluation, inference, sampling
from jaxtune.data import formats
from train_helpers import without_torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(name, *args):
  env = without_torch(dict(os.environ, PYTHONIOENCODING="utf-8", JAX_PLATFORMS="cpu"))
  return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", name), *args],
                        capture_output=True, text=True, env=env, timeout=600)


def assert_one_line_error(proc, *fragments):
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ")
  for fragment in fragments:
    assert fragment in last, last


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  return hf_tiny.tiny_folder(tmp_path_factory, "qwen2")


def test_evaluate_last_line_is_the_json_result(folder, tmp_path):
  data = tmp_path / "text.jsonl"
  data.write_text("\n".join(json.dumps({"text": t}) for t in ["short", "a somewhat longer line", "x" * 90]))
  proc = run_script("evaluate.py", "--model", folder, "--data", str(data), "--batch_size", "2")
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  expected = evaluation.evaluate_path(folder, str(data), "text", batch_size=2)
  assert result["tokens"] == expected["tokens"] == 4 + 21 + 89
  assert result["records"] == 3
  assert abs(result["loss"] - expected["loss"]) < 1e-6
  assert abs(result["perplexity"] - expected["perplexity"]) < 1e-6 * expected["perplexity"]


def test_evaluate_bad_input_is_one_line(folder, tmp_path):
  data = tmp_path / "bad.jsonl"
  data.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"txt": "oops"}) + "\n")
  assert_one_line_error(run_script("evaluate.py", "--model", folder, "--data", str(data)),
                        f"{data}:2:", "'text'")
  data.write_text(json.dumps({"text": "fine"}) + "\n{not json\n")
  assert_one_line_error(run_script("evaluate.py", "--model", folder, "--data", str(data)),
                        f"{data}:2:", "invalid JSON")
  missing = str(tmp_path / "no_such_model")
  assert_one_line_error(run_script("evaluate.py", "--model", missing, "--data", str(data)), missing)


def test_generate_json_uses_the_chat_template(folder):
  prompts = ["What is JAX?", "Hi"]
  proc = run_script("generate.py", "--model", folder, "--prompt", prompts[0], "--prompt", prompts[1],
                    "--max_new_tokens", "12", "--json")
  assert proc.returncode == 0, proc.stderr
  rows = [json.loads(line) for line in proc.stdout.strip().splitlines()]
  cfg, params, peft, tokenizer = inference.load_for_inference(folder)
  ids = [sampling.prompt_ids(tokenizer, p, chat=True) for p in prompts]
  # The chat template wraps the prompt: <|im_start|>user\n...<|im_end|>\n<|im_start|>assistant\n
  assert ids[1] == tokenizer("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")["input_ids"]
  outputs = sampling.generate(params, cfg, ids, max_new_tokens=12,
                              eos_ids=inference.eos_ids(cfg, tokenizer), pad_id=tokenizer.pad_token_id)
  assert rows == [{"prompt": p, "completion": tokenizer.decode(o, skip_special_tokens=True)}
                  for p, o in zip(prompts, outputs)]


def test_generate_bad_input_is_one_line(folder):
  assert_one_line_error(run_script("generate.py", "--model", folder, "--prompt", "x", "--top_p", "0"),
                        "--top_p")
  missing = folder + "_missing"
  assert_one_line_error(run_script("generate.py", "--model", missing, "--prompt", "x"), missing)


def test_generate_compute_dtype_reaches_sampling(folder):
  """--compute_dtype bfloat16 decodes in bf16: generate.py run with sampling.generate wrapped to
  record the dtype it gets (a tiny model's tokens are the same in both precisions)."""
  spy = ("import runpy, sys\n"
         "from jaxtune import sampling\n"
         "original = sampling.generate\n"
         "def recording(*args, **kwargs):\n"
         "  print('compute_dtype', kwargs['compute_dtype'], file=sys.stderr)\n"
         "  return original(*args, **kwargs)\n"
         "sampling.generate = recording\n"
         "sys.argv = ['generate.py'] + sys.argv[1:]\n"
         f"runpy.run_path({os.path.join(ROOT, 'scripts', 'generate.py')!r}, run_name='__main__')\n")
  for flag, want in (([], "float32"), (["--compute_dtype", "bfloat16"], "bfloat16")):
    proc = subprocess.run([sys.executable, "-c", spy, "--model", folder, "--prompt", "Hi", "--max_new_tokens", "4",
                           *flag], capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"compute_dtype {want}" in proc.stderr.splitlines()
  assert_one_line_error(run_script("generate.py", "--model", folder, "--prompt", "x", "--compute_dtype", "int8"),
                        "--compute_dtype")


RECORDS = [{"instruction": "Name a colour.", "output": "Blue"},
           {"instruction": "Add the numbers.", "context": "2 and 3", "output": "5"},
           {"instruction": "Say hi."}]  # no output: nothing to compare, still a prompt


@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_generation_prompts_are_what_training_puts_before_the_response(folder, template):
  tokenizer = inference.load_for_inference(folder)[3]
  for record in RECORDS[:2]:
    prompt, reference = formats.generation_prompt(record, "instruction", tokenizer, template=template)
    encoded = formats.encode_instruction(record, tokenizer, template=template)
    assert prompt == encoded.ids[:encoded.loss_mask.index(1)] and reference == record["output"]
  turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
           {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue"}]
  prompt, reference = formats.generation_prompt({"messages": turns}, "chat", tokenizer)
  encoded = formats.encode_chat({"messages": turns}, tokenizer)
  last_target_start = max(j for j in range(1, len(encoded.ids)) if encoded.loss_mask[j] and not encoded.loss_mask[j - 1])
  assert prompt == encoded.ids[:last_target_start] and reference == "Blue"
  assert formats.generation_prompt({"messages": turns[:3]}, "chat", tokenizer) == (prompt, None)


def test_generate_responds_to_a_data_file_in_batches(folder, tmp_path):
  data = tmp_path / "instructions.jsonl"
  data.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
  proc = run_script("generate.py", "--model", folder, "--data", str(data), "--batch_size", "2",
                    "--max_new_tokens", "6")
  assert proc.returncode == 0, proc.stderr
  rows = [json.loads(line) for line in proc.stdout.strip().splitlines()]
  cfg, params, peft, tokenizer = inference.load_for_inference(folder)
  prompts = [formats.generation_prompt(r, "instruction", tokenizer, template="chat")[0] for r in RECORDS]
  expected = []
  for batch in (prompts[:2], prompts[2:]):
    expected += sampling.generate(params, cfg, batch, max_new_tokens=6, eos_ids=inference.eos_ids(cfg, tokenizer),
                                  pad_id=tokenizer.pad_token_id)
  assert rows == [{"source": f"{data}:{i + 1}", "reference": r.get("output"),
                   "completion": tokenizer.decode(e, skip_special_tokens=True)}
                  for i, (r, e) in enumerate(zip(RECORDS, expected))]
  data.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps({"output": "x"}) + "\n")
  assert_one_line_error(run_script("generate.py", "--model", folder, "--data", str(data)),
                        f"{data}:2:", "'instruction'")
  assert_one_line_error(run_script("generate.py", "--model", folder, "--data", str(data), "--prompt", "x"),
                        "--prompt", "--data")
