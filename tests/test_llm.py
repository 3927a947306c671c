"""The decoder-only LLM port (`ella_jax.models.llm`, `ella_jax.weights.llm.load_llm`) against
transformers: the fixtures' Llama (llama3 RoPE), Mistral and Qwen2 (biases) at every layer of a
right-padded batch, and Llama folders built here with transformers' PyTorch classes: CausalLM
checkpoints in shards, the older config keys, linear and dynamic RoPE, attention and MLP biases."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import (
    REFERENCE,
    ROOT,
    project_config,
    read_tensors,
    relative_error,
    subprocess_env,
    tiny_config,
    tiny_llm_folder,
)

from ella_jax.train.trainer import ConfigError, check_config
from ella_jax.weights.llm import load_llm
from ella_jax.weights.tensors import CheckpointError

LLM = REFERENCE / "llm"


def real(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return np.asarray(hidden)[np.asarray(mask, bool)]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_every_layer_matches_transformers(family):
    model, params = load_llm(LLM / family)
    io = np.load(LLM / f"{family}_io.npz")
    ids, mask = io["input_ids"], io["attention_mask"]
    apply = jax.jit(model.apply, static_argnames="layer")
    layers = model.config.num_hidden_layers
    for k in range(layers + 1):
        out = apply({"params": params}, ids, mask, layer=k)
        assert relative_error(real(out, mask), real(io[f"hidden_{k}"], mask)) < 1e-5, k
    last = apply({"params": params}, ids, mask)
    assert relative_error(real(last, mask), real(io[f"hidden_{layers}"], mask)) < 1e-5


def torch_llama(folder, causal_lm: bool, **config):
    """A random tiny transformers Llama saved to `folder` (in shards), and its hidden states on
    a right-padded batch: (input_ids, attention_mask, hidden states tuple)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaModel

    torch.manual_seed(0)
    settings = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
                    tie_word_embeddings=causal_lm)  # fmt: skip
    model = (LlamaForCausalLM if causal_lm else LlamaModel)(LlamaConfig(**{**settings, **config}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if "norm" in name else 0.0))
    model.eval().save_pretrained(folder, max_shard_size="100KB")
    ids = torch.randint(0, 101, (2, 13))
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, 9:] = 0
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    return ids.numpy(), mask.numpy(), [h.numpy() for h in out.hidden_states]


@pytest.mark.parametrize(
    "case, config",
    [
        ("dynamic RoPE past max positions", dict(rope_parameters=dict(
            rope_type="dynamic", factor=2.0, rope_theta=10000.0), max_position_embeddings=8)),
        ("linear RoPE, old config keys", dict(rope_parameters=dict(
            rope_type="linear", factor=2.0, rope_theta=5000.0))),
        ("attention and MLP biases", dict(attention_bias=True, mlp_bias=True)),
    ],
)  # fmt: skip
@pytest.mark.parametrize("causal_lm", [True, False])
def test_llama_folders_built_by_transformers(tmp_path, case, config, causal_lm):
    ids, mask, hidden = torch_llama(tmp_path, causal_lm, **config)
    assert (tmp_path / "model.safetensors.index.json").is_file()  # sharded
    if "old config keys" in case:
        raw = json.loads((tmp_path / "config.json").read_text())
        rope = raw.pop("rope_parameters")
        raw["rope_theta"] = rope.pop("rope_theta")
        raw["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
        (tmp_path / "config.json").write_text(json.dumps(raw))
    model, params = load_llm(tmp_path)
    for k, expected in enumerate(hidden):
        out = model.apply({"params": params}, ids, mask, layer=k)
        assert relative_error(real(out, mask), real(expected, mask)) < 1e-5, (case, k)


def test_a_longer_input_than_mistrals_window_is_refused(tmp_path):
    raw = json.loads((LLM / "mistral" / "config.json").read_text())
    raw["sliding_window"] = 8
    folder = tmp_path / "mistral"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(raw))
    (folder / "model.safetensors").symlink_to(LLM / "mistral" / "model.safetensors")
    model, params = load_llm(folder)
    ids = np.zeros((1, 8), np.int32)
    assert model.apply({"params": params}, ids).shape == (1, 8, 96)
    with pytest.raises(ValueError, match="sliding window of 8"):
        model.apply({"params": params}, np.zeros((1, 9), np.int32))


@pytest.mark.parametrize(
    "change, named",
    [
        ({"model_type": "gemma"}, "model_type='gemma'"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "'yarn'"),
        ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, "'factor'"),
        ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
          "attention_factor": 2.0, "rope_theta": 1e4}}, "'attention_factor'"),
    ],
)  # fmt: skip
def test_unsupported_config_fields_are_named(tmp_path, change, named):
    raw = {**json.loads((LLM / "llama" / "config.json").read_text()), **change}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=f"config.json: .*{named}"):
        load_llm(tmp_path)


def test_bfloat16_stays_near_float32():
    io = np.load(LLM / "llama_io.npz")
    ids, mask = io["input_ids"], io["attention_mask"]
    model, params = load_llm(LLM / "llama", dtype="bfloat16")
    out = np.asarray(model.apply({"params": params}, ids, mask), np.float32)
    assert relative_error(real(out, mask), real(io["hidden_3"], mask)) < 3e-2


def test_tiny_run_trains_ella_on_an_llm(tmp_path):
    """`python -m train.main --config configs/tiny.py --config.text_encoder.kind=llm
    --config.text_encoder.path=...` on the fixture Llama at layer 2: the connector reads the
    LLM's width; its export renders through `generate --t5 LLM --text-layer 2`; a layer the
    LLM does not have, or a T5 folder said to be an LLM, is one error line naming the key."""
    from ella_jax import load_ella
    from ella_jax.generate import main as generate

    llm = tiny_llm_folder(tmp_path / "llm")
    workdir = tmp_path / "run"
    base = [sys.executable, "-m", "train.main", "--config", "configs/tiny.py",
            f"--workdir={workdir}", "--config.text_encoder.kind=llm",
            f"--config.text_encoder.path={llm}"]  # fmt: skip
    steps = ["--config.total_steps=4", "--config.checkpoint_every=4", "--config.sample_every=4",
             "--config.log_every=2", "--config.text_encoder.layer=2"]  # fmt: skip
    run = subprocess.run([*base, *steps], cwd=ROOT, env=subprocess_env(), capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    model, _ = load_ella(workdir / "ella.safetensors")
    assert model.input_dim == 96
    assert list((workdir / "samples").glob("*.png"))
    saved = json.loads((workdir / "config.json").read_text())["text_encoder"]
    assert (saved["kind"], saved["layer"]) == ("llm", 2)
    argv = ["--sd", str(REFERENCE / "sd"), "--t5", str(llm), "--text-layer", "2", "--ella",
            str(workdir / "ella.safetensors"), "--size", "16", "--steps", "2", "--prompt",
            "a red square", "--out", str(tmp_path / "images")]  # fmt: skip
    assert generate(argv) == 0 and (tmp_path / "images" / "0_a-red-square.png").is_file()

    config = tiny_config()
    for change, named in (
        ({"path": str(llm), "layer": 9}, "config.text_encoder.layer=9, but"),
        ({"path": str(REFERENCE / "t5"), "kind": "llm"}, "config.text_encoder.kind='llm', but"),
        ({"path": str(llm), "kind": "gpt"}, "config.text_encoder.kind='gpt': use one of"),
    ):
        config.text_encoder.update(change)
        with pytest.raises(ConfigError, match=named):
            check_config(config)
        config.text_encoder.update(kind="", layer=None)


def test_toy_llm_is_a_transformers_llama_and_rewrites_the_same():
    """models/toy/llm: transformers loads it and computes what the port computes; its tokenizer
    starts with <s> and pads with the end token on the right."""
    import torch
    from transformers import LlamaModel

    from ella_jax.text import load_tokenizer, tokenize

    toy = ROOT / "models" / "toy" / "llm"
    tokenizer = load_tokenizer(toy)
    ids, mask = tokenize(tokenizer, ["a red square to the left of a blue circle", "one"], None)
    assert ids[0, 0] == ids[1, 0] == tokenizer.bos_token_id and mask[1].sum() == 2
    reference = LlamaModel.from_pretrained(toy, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(
            torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long()
        ).last_hidden_state.numpy()
    model, params = load_llm(toy)
    out = model.apply({"params": params}, ids, mask)
    assert relative_error(real(out, mask), real(expected, mask)) < 1e-5


def test_rewriting_the_toy_llm_gives_the_same_files(tmp_path):
    from toyworld.toy_llm import write_toy_llm

    write_toy_llm(ROOT / "models" / "toy" / "t5", tmp_path / "llm")
    shipped = ROOT / "models" / "toy" / "llm"
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "llm" / name).read_bytes() == (shipped / name).read_bytes(), name
    # The random initialisation's last float32 bits follow XLA's compile options (the tests'
    # differ from the command line's): equal to float16's precision.
    again = read_tensors(tmp_path / "llm" / "model.safetensors")
    for name, tensor in read_tensors(shipped / "model.safetensors").items():
        np.testing.assert_allclose(again[name], tensor, rtol=2e-3, atol=1e-4, err_msg=name)


def test_tinyllama_config_is_the_t5_recipe_on_an_llm():
    from ella_jax.train.text_encoder import text_encoder

    config, paper = project_config("ella_sd15_tinyllama"), project_config("ella_sd15_t5xl")
    config.text_encoder.path = str(LLM / "llama")
    encoder = text_encoder(config)
    assert (encoder.kind, encoder.layer, encoder.dtype) == ("llm", None, "float16")
    assert {k: v for k, v in config.items() if k != "text_encoder"} == {
        k: v for k, v in paper.items() if k != "text_encoder"
    }
