"""The CLIP text encoder against transformers' `CLIPTextModel`; its loader; the CLIP tokenizer."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from conftest import REFERENCE, relative_error

from ella_jax.text import load_tokenizer, tokenize
from ella_jax.weights.clip import load_clip_text_encoder
from ella_jax.weights.tensors import CheckpointError, read_safetensors

SD = REFERENCE / "sd"
PROMPTS = [*np.load(REFERENCE / "pipeline_io.npz")["prompts"].tolist(), ""]


def torch_outputs(folder, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """transformers' (last_hidden_state, pooler_output) of the `CLIPTextModel` in `folder`."""
    model = transformers.CLIPTextModel.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model(torch.from_numpy(ids).long())
    return out.last_hidden_state.numpy(), out.pooler_output.numpy()


@pytest.fixture(scope="module")
def reference():
    ids, _ = tokenize(load_tokenizer(SD / "tokenizer"), PROMPTS, 77)
    return ids, torch_outputs(SD / "text_encoder", ids)


@pytest.mark.parametrize(
    "dtype, tolerance", [(jnp.float32, 1e-4), (jnp.float16, 1e-2), (jnp.bfloat16, 5e-2)]
)
def test_matches_transformers(reference, dtype, tolerance):
    ids, (hidden, pooled) = reference
    model, params = load_clip_text_encoder(SD / "text_encoder", dtype=dtype)
    # Measured: float16 ~1e-3, bfloat16 ~8e-3.
    out_hidden, out_pooled = jax.jit(model.apply)({"params": params}, ids)
    assert out_hidden.shape == hidden.shape and out_hidden.dtype == dtype
    assert out_pooled.shape == pooled.shape and out_pooled.dtype == dtype
    assert relative_error(out_hidden, hidden) < tolerance
    assert relative_error(out_pooled, pooled) < tolerance


def tiny_ids(eos_token_id: int, vocab_size: int, rng: np.random.Generator) -> np.ndarray:
    """(3, 12) random ids, each row ending in end tokens from a different position; the largest
    id is elsewhere, so the legacy and the eos_token_id pooling rules pick different tokens."""
    ids = rng.integers(8, vocab_size - 1, (3, 12))  # no end token (7 or 2) before its place
    ids[:, 1] = vocab_size - 1
    for row, start in enumerate([11, 6, 2]):
        ids[row, start:] = eos_token_id
    return ids.astype(np.int32)


@pytest.fixture(scope="module", params=[("gelu", 7), ("gelu_new", 2)], ids=["eos", "legacy"])
def tiny(request, tmp_path_factory):
    """A random `CLIPTextModel` folder (hidden_act, eos_token_id from the parameter), ids and
    transformers' outputs on them."""
    hidden_act, eos_token_id = request.param
    config = transformers.CLIPTextConfig(
        vocab_size=50,
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=3,
        num_attention_heads=3,
        max_position_embeddings=16,
        hidden_act=hidden_act,
        eos_token_id=eos_token_id,
        bos_token_id=0,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    model = transformers.CLIPTextModel(config).eval()
    with torch.no_grad():  # the init leaves biases at zero and norms at one
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder, safe_serialization=True)
    ids = tiny_ids(eos_token_id, config.vocab_size, np.random.default_rng(0))
    return folder, ids, torch_outputs(folder, ids)


def test_tiny_model_matches_transformers(tiny):
    folder, ids, (hidden, pooled) = tiny
    model, params = load_clip_text_encoder(folder)
    out_hidden, out_pooled = model.apply({"params": params}, ids)
    assert relative_error(out_hidden, hidden) < 1e-4
    assert relative_error(out_pooled, pooled) < 1e-4


def test_prefixed_state_dict_with_position_ids(tiny, tmp_path):
    """The layout of released Stable Diffusion folders (saved by transformers 4): every name
    under `text_model.`, with the `position_ids` buffer."""
    folder, ids, (hidden, pooled) = tiny
    tensors = {
        f"text_model.{n}": t for n, t in read_safetensors(folder / "model.safetensors").items()
    }
    tensors["text_model.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
    safetensors.numpy.save_file(tensors, tmp_path / "model.safetensors")
    shutil.copy(folder / "config.json", tmp_path)
    model, params = load_clip_text_encoder(tmp_path)
    out_hidden, out_pooled = model.apply({"params": params}, ids)
    assert relative_error(out_hidden, hidden) < 1e-4
    assert relative_error(out_pooled, pooled) < 1e-4


def test_tokenizer_from_vocab_and_merges(tmp_path):
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        shutil.copy(SD / "tokenizer" / name, tmp_path)
    full, full_mask = tokenize(load_tokenizer(SD / "tokenizer"), PROMPTS, 77)
    bpe, bpe_mask = tokenize(load_tokenizer(tmp_path), PROMPTS, 77)
    np.testing.assert_array_equal(bpe, full)
    np.testing.assert_array_equal(bpe_mask, full_mask)


def test_unsupported_activation(tmp_path):
    config = json.loads((SD / "text_encoder" / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "hidden_act": "foo"}))
    shutil.copy(SD / "text_encoder" / "model.safetensors", tmp_path)
    with pytest.raises(CheckpointError, match=r"config\.json: hidden_act='foo' is not supported"):
        load_clip_text_encoder(tmp_path)


def test_missing_weights(tmp_path):
    shutil.copy(SD / "text_encoder" / "config.json", tmp_path)
    with pytest.raises(CheckpointError, match=r"model\.safetensors") as error:
        load_clip_text_encoder(tmp_path)
    assert str(tmp_path) in str(error.value)
