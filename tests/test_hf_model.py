"""Whole Hugging Face models in (models/hf.py): tiny random Qwen3-MoE and Mixtral
checkpoints in the published names and layout (config.json, two safetensors shards and
their index, bf16 or f32) load on a 2x4 mesh with the trainer's shardings and give the
logits of a float64 numpy reference of the whole model, and of transformers' own model
when it is installed; scripts/convert_hf.py writes a run that scripts/train.py
continues (its first loss is the converted model's), text tokenized with the
checkpoint's tokenizer.json; bad input is one line; the README's commands run.
"""

import dataclasses
import json
import pathlib
import re
import shlex
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("safetensors")

from hiermoe_jax.errors import ConfigError  # noqa: E402
from helpers import mesh_of, xla_flags  # noqa: E402
from models import data as data_lib  # noqa: E402
from models import hf  # noqa: E402
from models.config import ModelConfig  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOL = 1e-5  # max |logits - reference| / max |reference|, float32 compute
SCANNABLE = any(f.name == "scan_layers" for f in dataclasses.fields(ModelConfig))
DROP = object()  # a config.json key left out
WORDS = ("the expert router sends each token to a few experts while the attention layer "
         "mixes tokens along the sequence and a norm keeps every scale in check").split()


def hf_config(family: str, **extra) -> dict:
  """A tiny config.json in the published spelling (Qwen3-30B-A3B's, Mixtral-8x7B's)."""
  if family == "qwen3_moe":
    config = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
        "vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "intermediate_size": 40, "moe_intermediate_size": 24, "num_experts": 8,
        "num_experts_per_tok": 2, "norm_topk_prob": True, "decoder_sparse_step": 1,
        "mlp_only_layers": [0], "hidden_act": "silu", "rms_norm_eps": 1e-6,
        "rope_theta": 1e6, "rope_scaling": None, "max_position_embeddings": 256,
        "attention_bias": False, "attention_dropout": 0.0, "use_sliding_window": False,
        "sliding_window": None, "max_window_layers": 3, "tie_word_embeddings": False,
        "router_aux_loss_coef": 0.001, "output_router_logits": False,
        "initializer_range": 0.02, "use_cache": True, "torch_dtype": "bfloat16",
        "bos_token_id": 0, "eos_token_id": 0}
  else:
    config = {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "vocab_size": 101, "hidden_size": 32, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 24,
        "num_local_experts": 8, "num_experts_per_tok": 2, "hidden_act": "silu",
        "rms_norm_eps": 1e-5, "rope_theta": 1e6, "max_position_embeddings": 256,
        "sliding_window": None, "attention_dropout": 0.0, "tie_word_embeddings": False,
        "router_aux_loss_coef": 0.02, "router_jitter_noise": 0.0,
        "output_router_logits": False, "initializer_range": 0.02, "use_cache": True,
        "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}
  config.update(extra)
  return {k: v for k, v in config.items() if v is not DROP}


def hf_weights(config: dict, seed: int = 0) -> dict:
  """Random float64 tensors under the checkpoint names, [out, in] as torch stores them."""
  rng = np.random.default_rng(seed)
  d, v = config["hidden_size"], config["vocab_size"]
  n, g = config["num_attention_heads"], config["num_key_value_heads"]
  h = config.get("head_dim") or d // n
  mixtral = config["model_type"] == "mixtral"
  e = config["num_local_experts" if mixtral else "num_experts"]
  f_moe = config["intermediate_size" if mixtral else "moe_intermediate_size"]
  dense = set(config.get("mlp_only_layers") or ())
  linear = lambda out, inp: rng.standard_normal((out, inp)) / np.sqrt(inp)
  norm = lambda dim: 1 + 0.1 * rng.standard_normal(dim)
  w = {"model.embed_tokens.weight": rng.standard_normal((v, d)), "model.norm.weight": norm(d)}
  if not config["tie_word_embeddings"]:
    w["lm_head.weight"] = linear(v, d)
  for i in range(config["num_hidden_layers"]):
    p = f"model.layers.{i}."
    w[p + "input_layernorm.weight"] = norm(d)
    w[p + "post_attention_layernorm.weight"] = norm(d)
    for proj, out in (("q", n * h), ("k", g * h), ("v", g * h)):
      w[f"{p}self_attn.{proj}_proj.weight"] = linear(out, d)
    w[p + "self_attn.o_proj.weight"] = linear(d, n * h)
    if not mixtral:
      w[p + "self_attn.q_norm.weight"] = norm(h)
      w[p + "self_attn.k_norm.weight"] = norm(h)
    if i in dense:
      f = config["intermediate_size"]
      w[p + "mlp.gate_proj.weight"], w[p + "mlp.up_proj.weight"] = linear(f, d), linear(f, d)
      w[p + "mlp.down_proj.weight"] = linear(d, f)
      continue
    moe = p + ("block_sparse_moe." if mixtral else "mlp.")
    w[moe + "gate.weight"] = linear(e, d)
    names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    for x in range(e):
      w[f"{moe}experts.{x}.{names[0]}.weight"] = linear(f_moe, d)
      w[f"{moe}experts.{x}.{names[1]}.weight"] = linear(f_moe, d)
      w[f"{moe}experts.{x}.{names[2]}.weight"] = linear(d, f_moe)
  return w


def write_checkpoint(path, config: dict, dtype: str = "bfloat16", *, files: int = 2,
                     seed: int = 0, weights: dict | None = None) -> dict:
  """config.json and the weights in `dtype`, in `files` safetensors shards with their
  index (one file: model.safetensors); returns the stored values as float64."""
  from safetensors.numpy import save_file
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  (path / "config.json").write_text(json.dumps(config, indent=2))
  np_dtype = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
  stored = {k: v.astype(np_dtype) for k, v in (weights or hf_weights(config, seed)).items()}
  names = sorted(stored)
  if files == 1:
    save_file(stored, str(path / "model.safetensors"), metadata={"format": "pt"})
  else:
    weight_map = {}
    for i, chunk in enumerate(np.array_split(np.array(names, dtype=object), files)):
      file = f"model-{i + 1:05d}-of-{files:05d}.safetensors"
      save_file({k: stored[k] for k in chunk}, str(path / file), metadata={"format": "pt"})
      weight_map.update(dict.fromkeys(chunk, file))
    total = sum(a.nbytes for a in stored.values())
    (path / hf.SAFETENSORS_INDEX).write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
  return {k: v.astype(np.float64) for k, v in stored.items()}


def text_corpus(words: int = 6000, seed: int = 0) -> str:
  rng = np.random.default_rng(seed)
  lines = [" ".join(rng.choice(WORDS, size=12)) + "." for _ in range(words // 12)]
  return "\n".join(lines) + "\n"


def write_tokenizer(path, vocab_size: int = 90) -> pathlib.Path:
  """A tiny BPE tokenizer.json trained on the corpus' words (ids < vocab_size)."""
  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["[UNK]"])
  tok.train_from_iterator([text_corpus(600, seed=1)], trainer)
  path = pathlib.Path(path) / data_lib.TOKENIZER_FILE
  tok.save(str(path))
  return path


# ---------------------------------------------------------------------------- reference

def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rotate_half(x):
  half = x.shape[-1] // 2
  return np.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def _silu(x):
  return x / (1 + np.exp(-x))


def reference_logits(config: dict, w: dict, tokens_BS) -> np.ndarray:
  """The whole model in float64 numpy, from config.json and the HF-named weights:
  embeddings, pre-norm blocks (RMSNorm; RoPE attention, GQA, Qwen3's q/k norm; dense
  SwiGLU or softmax top-k routed SwiGLU experts), final norm, unembedding."""
  mixtral = config["model_type"] == "mixtral"
  d, n = config["hidden_size"], config["num_attention_heads"]
  g = config["num_key_value_heads"]
  h = config.get("head_dim") or d // n
  eps, theta = config["rms_norm_eps"], config["rope_theta"]
  k_top = config["num_experts_per_tok"]
  e = config["num_local_experts" if mixtral else "num_experts"]
  renorm = True if mixtral else config["norm_topk_prob"]
  dense = set(config.get("mlp_only_layers") or ())
  b, s = tokens_BS.shape
  inv_freq = 1.0 / theta ** (np.arange(0, h, 2) / h)
  freqs = np.arange(s)[:, None] * inv_freq[None, :]
  emb = np.concatenate([freqs, freqs], axis=-1)  # [S, H]
  cos, sin = np.cos(emb)[:, None, :], np.sin(emb)[:, None, :]
  causal = np.tril(np.ones((s, s), bool))
  x = w["model.embed_tokens.weight"][tokens_BS]  # [B, S, D]
  for i in range(config["num_hidden_layers"]):
    p = f"model.layers.{i}."
    y = _rms(x, w[p + "input_layernorm.weight"], eps)
    q = (y @ w[p + "self_attn.q_proj.weight"].T).reshape(b, s, n, h)
    k = (y @ w[p + "self_attn.k_proj.weight"].T).reshape(b, s, g, h)
    v = (y @ w[p + "self_attn.v_proj.weight"].T).reshape(b, s, g, h)
    if not mixtral:
      q = _rms(q, w[p + "self_attn.q_norm.weight"], eps)
      k = _rms(k, w[p + "self_attn.k_norm.weight"], eps)
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    out = np.empty((b, s, n, h))
    for head in range(n):
      kv = head // (n // g)
      scores = np.einsum("bqh,bkh->bqk", q[:, :, head], k[:, :, kv]) / np.sqrt(h)
      scores = np.where(causal, scores, -np.inf)
      probs = np.exp(scores - scores.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      out[:, :, head] = np.einsum("bqk,bkh->bqh", probs, v[:, :, kv])
    x = x + out.reshape(b, s, n * h) @ w[p + "self_attn.o_proj.weight"].T
    y = _rms(x, w[p + "post_attention_layernorm.weight"], eps).reshape(b * s, d)
    if i in dense:
      ffn = (_silu(y @ w[p + "mlp.gate_proj.weight"].T) * (y @ w[p + "mlp.up_proj.weight"].T)
             ) @ w[p + "mlp.down_proj.weight"].T
    else:
      moe = p + ("block_sparse_moe." if mixtral else "mlp.")
      names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
      logits = y @ w[moe + "gate.weight"].T
      probs = np.exp(logits - logits.max(-1, keepdims=True))
      probs /= probs.sum(-1, keepdims=True)
      top = np.argsort(-probs, axis=-1)[:, :k_top]
      weights = np.take_along_axis(probs, top, axis=-1)
      if renorm:
        weights /= weights.sum(-1, keepdims=True)
      ffn = np.zeros_like(y)
      for t in range(b * s):
        for j in range(k_top):
          ex = f"{moe}experts.{top[t, j]}."
          hidden = _silu(w[ex + names[0] + ".weight"] @ y[t]) * (w[ex + names[1] + ".weight"]
                                                                  @ y[t])
          ffn[t] += weights[t, j] * (w[ex + names[2] + ".weight"] @ hidden)
      assert e == w[moe + "gate.weight"].shape[0]
    x = x + ffn.reshape(b, s, d)
  x = _rms(x, w["model.norm.weight"], eps)
  unembed = w["model.embed_tokens.weight" if config["tie_word_embeddings"] else "lm_head.weight"]
  return x @ unembed.T


def rel_error(actual, expected) -> float:
  return float(np.max(np.abs(np.asarray(actual, np.float64) - expected))
               / np.max(np.abs(expected)))


def tokens(config: dict, b: int = 2, s: int = 16, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, config["vocab_size"], (b, s), dtype=np.int32)


def logits_of(model, tokens_BS):
  """model(tokens), inside nnx.capture: the Transformer sows its MoE aux."""
  forward = nnx.jit(lambda m, t: nnx.capture(m, nnx.Intermediate)(t)[0])
  return np.asarray(forward(model, tokens_BS))


# ---------------------------------------------------------------------------- loading

CASES = {  # name: (family, stored dtype, shard files, config.json changes)
    "qwen3_moe-bf16-2files": ("qwen3_moe", "bfloat16", 2, {}),
    # transformers 5's spelling of RoPE; tied embeddings (no lm_head.weight).
    "qwen3_moe-f32-2files-tied": ("qwen3_moe", "float32", 2, {
        "rope_theta": DROP, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
        "tie_word_embeddings": True}),
    "mixtral-bf16-2files": ("mixtral", "bfloat16", 2, {}),
    "mixtral-f32-1file": ("mixtral", "float32", 1, {}),
}


def _case_config(family, extra):
  config = hf_config(family, **extra)
  if "rope_theta" not in config:  # the reference reads it
    config["rope_theta"] = config["rope_parameters"]["rope_theta"]
  return config


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_the_float64_reference(case, tmp_path):
  family, dtype, files, extra = CASES[case]
  config = hf_config(family, **extra)
  weights = write_checkpoint(tmp_path, config, dtype, files=files)
  mesh = mesh_of("2x4")
  model, cfg = hf.load_pretrained(tmp_path, mesh=mesh)
  assert cfg.model.first_k_dense == (1 if family == "qwen3_moe" else 0)
  assert cfg.model.qk_norm == (family == "qwen3_moe")
  assert (cfg.mesh.nodes, cfg.mesh.local) == (2, 4)
  tokens_BS = tokens(config)
  error = rel_error(logits_of(model, tokens_BS),
                    reference_logits(_case_config(family, extra), weights, tokens_BS))
  print(f"{case}: max rel. error vs float64 reference {error:.2e}")
  assert error <= TOL


def test_parameters_sit_on_the_trainer_shardings(tmp_path):
  """Every parameter and buffer has the sharding models.steps.Model gives it, and no
  device holds a whole expert stack."""
  from models.steps import Model
  config = hf_config("qwen3_moe")
  write_checkpoint(tmp_path, config)
  mesh = mesh_of("2x4")
  model, cfg = hf.load_pretrained(tmp_path, mesh=mesh)
  trainer = Model(cfg, mesh)
  params = nnx.state(model, nnx.Param)
  expected = jax.tree.leaves(trainer.state_shardings.params)
  actual = [x.sharding for x in jax.tree.leaves(params)]
  assert len(actual) == len(expected)
  for got, want, x in zip(actual, expected, jax.tree.leaves(params)):
    assert got.is_equivalent_to(want, x.ndim)
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    if "experts" in jax.tree_util.keystr(path):
      assert all(shard.data.shape[-3] == 1 for shard in x.addressable_shards)  # 8 experts / 8


@pytest.mark.skipif(not SCANNABLE, reason="model.scan_layers is not in this ModelConfig")
@pytest.mark.parametrize("scan", [True, False])
def test_both_state_layouts_load(scan, tmp_path):
  """Scanned layers (a leading layer axis per run of identical blocks) and unrolled ones."""
  config = hf_config("qwen3_moe", num_hidden_layers=4, mlp_only_layers=[0, 1])
  weights = write_checkpoint(tmp_path, config, "float32")
  model, cfg = hf.load_pretrained(tmp_path, mesh=mesh_of("2x4"),
                                  overrides=[f"model.scan_layers={str(scan).lower()}"])
  assert cfg.model.scan_layers is scan and cfg.model.first_k_dense == 2
  tokens_BS = tokens(config, seed=1)
  error = rel_error(logits_of(model, tokens_BS), reference_logits(config, weights, tokens_BS))
  assert error <= TOL


def test_fused_expert_layout_loads(tmp_path):
  """transformers 5's in-memory layout saved as is (mlp.experts.gate_up_proj [E, 2F, D],
  gate rows first; down_proj [E, D, F]) loads as the per-expert one."""
  config = hf_config("mixtral")
  weights = hf_weights(config)
  fused = {}
  for key, value in weights.items():
    m = re.fullmatch(r"(model\.layers\.\d+\.)block_sparse_moe\.(.*)", key)
    if not m:
      fused[key] = value
    elif not m.group(2).startswith("experts."):
      fused[f"{m.group(1)}mlp.{m.group(2)}"] = value
  for i in range(config["num_hidden_layers"]):
    ex = lambda x, n, i=i: weights[f"model.layers.{i}.block_sparse_moe.experts.{x}.{n}.weight"]
    experts = range(config["num_local_experts"])
    fused[f"model.layers.{i}.mlp.experts.gate_up_proj"] = np.stack(
        [np.concatenate([ex(x, "w1"), ex(x, "w3")]) for x in experts])
    fused[f"model.layers.{i}.mlp.experts.down_proj"] = np.stack([ex(x, "w2") for x in experts])
  write_checkpoint(tmp_path, config, "float32", weights=fused)
  model, _ = hf.load_pretrained(tmp_path, mesh=mesh_of("2x4"))
  tokens_BS = tokens(config)
  assert rel_error(logits_of(model, tokens_BS),
                   reference_logits(config, weights, tokens_BS)) <= TOL


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
  """transformers' own model of the same checkpoint (its conversion mapping reads the
  published names), eager attention, float32."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  family, dtype, files, extra = CASES[case]
  write_checkpoint(tmp_path, hf_config(family, **extra), dtype, files=files)
  hf_model, info = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
  assert not info["missing_keys"] and not info["unexpected_keys"], info
  tokens_BS = tokens(hf_config(family))
  with torch.no_grad():
    expected = hf_model.eval()(torch.from_numpy(tokens_BS).long()).logits.double().numpy()
  model, _ = hf.load_pretrained(tmp_path, mesh=mesh_of("2x4"))
  error = rel_error(logits_of(model, tokens_BS), expected)
  print(f"{case}: max rel. error vs transformers {transformers.__version__} {error:.2e}")
  assert error <= TOL


# ---------------------------------------------------------------------------- convert + train

def test_convert_then_train_continues(tmp_path, capsys, cache_dir):
  """convert_hf writes step 0, the config and the tokenizer; train.py resumes it: its
  first loss is the converted model's cross entropy on the first batch of the text,
  tokenized with the checkpoint's tokenizer.json."""
  from models import cli
  from models.config import DataConfig, load_config
  from models.metrics import read_metrics
  hf_dir, run_dir = tmp_path / "hf", tmp_path / "run"
  config = hf_config("qwen3_moe")
  write_checkpoint(hf_dir, config)
  write_tokenizer(hf_dir)
  corpus = tmp_path / "corpus.txt"
  corpus.write_text(text_corpus())
  sets = ["--set", "train.seq_len=16", "--set", "train.batch_size=8", "--set", "train.steps=2",
          "--set", "train.eval_every=0"]  # no eval step to compile: the losses are checked
  assert hf.main(["--hf-dir", str(hf_dir), "--run-dir", str(run_dir), "--mesh", "2x4",
                  *sets]) == 0
  assert (run_dir / "checkpoints" / "0").is_dir()
  assert (run_dir / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
  err = capsys.readouterr().err
  assert "converted" in err and "qwen3_moe" in err
  assert cli.main(["--config", str(run_dir / "config.yaml"), "--run-dir", str(run_dir),
                   "--data", str(corpus)]) == 0
  records = read_metrics(run_dir)
  assert [r["step"] for r in records] == [1, 2]
  assert (run_dir / "checkpoints" / "2").is_dir()

  # The same first batch through the converted model.
  cfg = load_config(run_dir / "config.yaml", [f"data.path={corpus}"])
  ids = data_lib.load_tokens(DataConfig(path=str(corpus)), run_dir / "tokenizer.json")
  from tokenizers import Tokenizer
  assert ids.tolist()[:50] == Tokenizer.from_file(str(hf_dir / "tokenizer.json")).encode(
      corpus.read_text(), add_special_tokens=False).ids[:50]
  train, _ = data_lib.split(ids, cfg.data.eval_fraction)
  inputs, targets = data_lib.Batches(train, cfg.train.batch_size, cfg.train.seq_len,
                                     cfg.train.seed).rows(0)
  model, _ = hf.load_pretrained(hf_dir, mesh=mesh_of("2x4"))
  logits = logits_of(model, inputs).astype(np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  ce = -np.take_along_axis(logp, targets[..., None], axis=-1).mean()
  assert abs(records[0]["loss"] - ce) <= 1e-4 * ce, (records[0]["loss"], ce)


def test_text_data_is_tokenized_with_the_runs_tokenizer(tmp_path):
  """A directory of text files: each file's ids, joined by a blank line's; bytes without
  a tokenizer; one-line errors for non-UTF-8 text and a broken tokenizer.json."""
  from tokenizers import Tokenizer
  from models.config import DataConfig
  path = write_tokenizer(tmp_path)
  assert data_lib.run_tokenizer(tmp_path) == path
  assert data_lib.run_tokenizer(tmp_path / "elsewhere") is None
  docs = tmp_path / "docs"
  docs.mkdir()
  texts = [text_corpus(60, seed=4), text_corpus(48, seed=5)]
  for name, text in zip(("a.txt", "b.txt"), texts):
    (docs / name).write_text(text)
  tok = Tokenizer.from_file(str(path))
  encode = lambda text: tok.encode(text, add_special_tokens=False).ids
  ids = data_lib.load_tokens(DataConfig(path=str(docs)), path)
  assert ids.dtype == np.uint16
  assert ids.tolist() == encode(texts[0]) + encode("\n\n") + encode(texts[1])
  assert data_lib.load_tokens(DataConfig(path=str(docs))).tolist() == list(
      (texts[0] + "\n\n" + texts[1]).encode())
  (docs / "c.txt").write_bytes(b"\xff\xfe bytes")
  with pytest.raises(ConfigError, match=r"c\.txt' is not UTF-8 text; it is tokenized with"):
    data_lib.load_tokens(DataConfig(path=str(docs)), path)
  (tmp_path / "broken.json").write_text("{}")
  with pytest.raises(ConfigError, match=r"^tokenizer .*broken\.json' is invalid: not a Hugging"):
    data_lib.load_tokens(DataConfig(path=str(docs / "a.txt")), tmp_path / "broken.json")


def _one_line_error(argv, capsys) -> str:
  assert hf.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  return err


def _bad_tensors(config):
  weights = hf_weights(config)
  del weights["model.layers.1.mlp.experts.3.up_proj.weight"]
  return weights


def _fp8_scales(config):
  return {**hf_weights(config), "model.layers.1.self_attn.q_proj.weight_scale_inv":
          np.ones((1, 1))}


BAD = {  # name: (family, config.json changes or None for no config.json, weights, message)
    "no config.json": ("qwen3_moe", None, None, r"--hf-dir=.* has no config\.json"),
    "model_type": ("qwen3_moe", {"model_type": "llama"}, None,
                   r"model_type='llama' is not supported .*\['mixtral', 'qwen3_moe'\]"),
    "mixtral sliding_window": ("mixtral", {"sliding_window": 64}, None,
                               (r"sliding_window=64 is not supported: .*"
                                r"max_position_embeddings=256")),
    "qwen3 use_sliding_window": ("qwen3_moe", {"use_sliding_window": True,
                                               "sliding_window": 64}, None,
                                 r"use_sliding_window=True is not supported"),
    "mlp_only_layers": ("qwen3_moe", {"mlp_only_layers": [1]}, None,
                        r"mlp_only_layers=\[1\] is not supported: it makes layers \[1\] dense"),
    "rope scaling": ("qwen3_moe", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
                     None, r"rope_scaling=.*yarn.* is not supported"),
    "missing tensor": ("qwen3_moe", {}, _bad_tensors,
                       r"missing tensor 'model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight'"),
    "fp8 scale": ("qwen3_moe", {}, _fp8_scales, r"holds tensor .*weight_scale_inv.*quantiz"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoints_are_one_line_errors(case, tmp_path, capsys):
  family, extra, weights, message = BAD[case]
  hf_dir = tmp_path / "hf"
  if extra is None:
    hf_dir.mkdir()
  else:
    config = hf_config(family, **extra)
    write_checkpoint(hf_dir, config, "float32",
                     weights=weights(config) if weights else hf_weights(hf_config(family)))
  err = _one_line_error(["--hf-dir", str(hf_dir), "--run-dir", str(tmp_path / "run"),
                         "--mesh", "2x4"], capsys)
  assert re.search(message, err), err
  assert not (tmp_path / "run" / "checkpoints").exists()


def test_refuses_a_run_dir_with_checkpoints(tmp_path, capsys):
  (tmp_path / "run" / "checkpoints" / "300").mkdir(parents=True)
  write_checkpoint(tmp_path / "hf", hf_config("mixtral"), "float32")
  err = _one_line_error(["--hf-dir", str(tmp_path / "hf"), "--run-dir", str(tmp_path / "run"),
                         "--mesh", "2x4"], capsys)
  assert "--run-dir=" in err and "already holds checkpoints (steps [300])" in err


def test_load_pretrained_errors_name_the_argument(tmp_path):
  with pytest.raises(ConfigError, match=r"^hf_dir=.* no such directory$"):
    hf.load_pretrained(tmp_path / "nope")
  write_checkpoint(tmp_path, hf_config("mixtral"), "float32")
  with pytest.raises(ConfigError, match=r"^mesh=.* is invalid: expected a jax Mesh"):
    hf.load_pretrained(tmp_path, mesh=jax.make_mesh((8,), ("x",)))


# ---------------------------------------------------------------------------- README

HEADING = "## Converting and continuing a Hugging Face model"


def _readme_commands() -> list[str]:
  text = (ROOT / "README.md").read_text()
  start = text.index(HEADING)
  end = text.find("\n## ", start + len(HEADING))
  blocks = re.findall(r"```bash\n(.*?)```", text[start:end], flags=re.S)
  lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
  return [re.sub(r"\s+#.*$", "", line).strip() for line in lines
          if line.strip() and not line.lstrip().startswith("#")]


def test_readme_commands_run(tmp_path):
  """The section's commands as written, on a tiny checkpoint in place of the real one:
  the download is skipped; paths, the mesh (8 CPU devices) and --steps are swapped."""
  pytest.importorskip("tokenizers")
  commands = _readme_commands()
  assert any("scripts/convert_hf.py" in c for c in commands)
  assert any("scripts/train.py" in c for c in commands)
  hf_dir, run_dir, corpus = tmp_path / "hf", tmp_path / "run", tmp_path / "corpus"
  write_checkpoint(hf_dir, hf_config("qwen3_moe"))
  write_tokenizer(hf_dir)
  corpus.mkdir()
  (corpus / "a.txt").write_text(text_corpus(seed=2))
  (corpus / "b.txt").write_text(text_corpus(seed=3))
  swaps = {"ckpt/Qwen3-30B-A3B": str(hf_dir), "runs/qwen3": str(run_dir),
           "my_corpus/": f"{corpus}/", "--mesh 4x8": "--mesh 2x4", "--steps 1000": "--steps 2"}
  env = {"XLA_FLAGS": xla_flags(), "JAX_PLATFORMS": "cpu",
         "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
  ran = 0
  for command in commands:
    if command.startswith(("hf ", "pip ", ".venv/bin/pip ")):
      continue  # downloads and installs
    for old, new in swaps.items():
      command = command.replace(old, new)
    argv = shlex.split(command)
    assert argv[0] == ".venv/bin/python", command
    result = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, env=env, check=False,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (command, result.stderr[-2000:])
    ran += 1
  assert ran >= 2
  assert (run_dir / "checkpoints" / "2").is_dir()
