"""The T5 encoder against transformers: the shared fixture, a ReLU T5, float16 with overflow."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from conftest import REFERENCE, randomized, relative_error

from ella_jax.text import load_tokenizer, tokenize
from ella_jax.weights.t5 import load_t5_encoder
from ella_jax.weights.tensors import CheckpointError

IO = np.load(REFERENCE / "pipeline_io.npz")
PROMPTS = [str(p) for p in IO["prompts"]]
T5_FOLDER = REFERENCE / "t5"


@pytest.fixture(scope="module")
def t5():
    return load_t5_encoder(T5_FOLDER)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(T5_FOLDER)


def test_fixed_tokenization_matches_reference(tokenizer):
    ids, mask = tokenize(tokenizer, PROMPTS, 128)
    np.testing.assert_array_equal(ids, IO["t5_fixed_ids"])
    np.testing.assert_array_equal(mask.sum(1), IO["t5_flex_lengths"])


def test_flexible_tokenization_keeps_each_prompt_whole(tokenizer):
    long_prompt = " ".join(["a red book"] * 60)
    ids, mask = tokenize(tokenizer, [*PROMPTS, long_prompt], None)
    lengths = mask.sum(1)
    assert list(lengths[:2]) == list(IO["t5_flex_lengths"]) and lengths[2] > 128
    assert ids.shape[1] % 16 == 0 and ids.shape[1] >= lengths.max()
    assert all(ids[i, n - 1] == tokenizer.eos_token_id for i, n in enumerate(lengths))


@pytest.mark.parametrize("key, prompts", [("t5_fixed", PROMPTS), ("t5_neg_fixed", ["", ""])])
def test_features_match_reference(t5, tokenizer, key, prompts):
    model, params = t5
    ids, mask = tokenize(tokenizer, prompts, 128)
    out = model.apply({"params": params}, ids, mask)
    assert out.shape == IO[key].shape
    assert relative_error(out, IO[key]) < 1e-4


def torch_encoder(folder, dtype=None):
    import torch
    from transformers import T5EncoderModel

    model = T5EncoderModel.from_pretrained(folder).eval()
    return model.to(dtype or torch.float32)


def torch_features(model, ids, mask):
    import torch

    with torch.no_grad():
        out = model(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    return out.last_hidden_state.float().numpy()


def test_flexible_batch_matches_one_prompt_at_a_time(t5, tokenizer):
    """A padded flexible batch gives each prompt the features of its unpadded run."""
    model, params = t5
    reference = torch_encoder(T5_FOLDER)
    ids, mask = tokenize(tokenizer, PROMPTS, None)
    out = np.asarray(model.apply({"params": params}, ids, mask))
    for i, n in enumerate(mask.sum(1)):
        expected = torch_features(reference, ids[i : i + 1, :n], mask[i : i + 1, :n])[0]
        assert relative_error(out[i, :n], expected) < 1e-4


def test_relu_t5_matches_transformers(tmp_path):
    """The original T5's ReLU feed-forward, with a single safetensors file."""
    import torch
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=50,
        d_model=32,
        d_kv=8,
        d_ff=48,
        num_layers=3,
        num_heads=4,
        feed_forward_proj="relu",
        relative_attention_num_buckets=8,
        relative_attention_max_distance=20,
    )
    torch.manual_seed(0)
    randomized(T5EncoderModel(config), std=0.2).save_pretrained(tmp_path)
    ids = np.random.default_rng(0).integers(2, 50, (2, 30)).astype(np.int32)
    mask = np.arange(30)[None] < np.array([[30], [13]])
    expected = torch_features(T5EncoderModel.from_pretrained(tmp_path).eval(), ids, mask)
    model, params = load_t5_encoder(tmp_path)
    out = model.apply({"params": params}, ids, mask)
    assert relative_error(np.asarray(out)[mask], expected[mask]) < 1e-4


def test_float16_clamps_like_transformers(tmp_path):
    """With `wo` scaled up until float16 overflows, both clamp the residual stream: the output
    stays finite and agrees with transformers' float16 run."""
    import torch

    folder = tmp_path / "t5"
    shutil.copytree(T5_FOLDER, folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    for shard in set(index["weight_map"].values()):
        tensors = safetensors.numpy.load_file(folder / shard)
        for name in tensors:
            if name.endswith("DenseReluDense.wo.weight"):
                tensors[name] = tensors[name] * 3e3
        safetensors.numpy.save_file(tensors, folder / shard)
    ids, mask = tokenize(load_tokenizer(folder), PROMPTS, 128)

    with torch.no_grad():
        states = torch_encoder(folder)(
            torch.from_numpy(ids).long(), torch.from_numpy(mask).long(), output_hidden_states=True
        ).hidden_states
    # In float32, the residual stream between blocks exceeds float16's range (65504).
    assert max(float(h.abs().max()) for h in states[:-1]) > 65504
    expected16 = torch_features(torch_encoder(folder, torch.float16), ids, mask)
    model, params = load_t5_encoder(folder, dtype=jnp.float16)
    out = np.asarray(jax.jit(model.apply)({"params": params}, ids, mask), np.float32)
    assert out.dtype == np.float32 and np.isfinite(out).all() and np.isfinite(expected16).all()
    assert relative_error(out, expected16) < 2e-2


def test_unsupported_activation_names_the_field(tmp_path):
    shutil.copytree(T5_FOLDER, tmp_path / "t5")
    config = json.loads((tmp_path / "t5" / "config.json").read_text())
    (tmp_path / "t5" / "config.json").write_text(
        json.dumps({**config, "feed_forward_proj": "gated-mish"})
    )
    with pytest.raises(CheckpointError, match="feed_forward_proj='gated-mish' is not supported"):
        load_t5_encoder(tmp_path / "t5")


def test_missing_weights_name_the_folder(tmp_path):
    (tmp_path / "config.json").write_text((T5_FOLDER / "config.json").read_text())
    with pytest.raises(
        CheckpointError, match=r"neither model\.safetensors nor model\.safetensors\.index"
    ):
        load_t5_encoder(tmp_path)
