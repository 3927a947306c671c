"""The toy decoder-only LLM (`models/toy/llm`): a random 2-layer Llama of width 128 (4 query
heads, 2 key/value heads) over the toy T5's words, the frozen "LLM" of the README's toy row that
sets ELLA on a decoder-only model beside ELLA on the toy T5. Its tokenizer starts every caption
with `<s>` and has no padding token, as Llama's. Written deterministically from the seed:

    python -m toyworld.toy_llm --t5 models/toy/t5 --out models/toy/llm [--seed 0]
"""

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp

from ella_jax.models.llm import DecoderLLM, LLMConfig
from ella_jax.storage import atomic_path
from toyworld.pretrain import write_json, write_model

LLAMA = {
    "architectures": ["LlamaModel"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 128,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": False,
}


def write_tokenizer(t5: Path, out: Path) -> int:
    """The toy T5's word vocabulary with a `<s>` token put before every text and no end token;
    returns the vocabulary size."""
    pipeline = json.loads((t5 / "tokenizer.json").read_text())
    bos = len(pipeline["model"]["vocab"])
    pipeline["model"]["vocab"].append(["<s>", 0.0])
    pipeline["added_tokens"].append(
        {
            "id": bos,
            "content": "<s>",
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
    )
    pipeline["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}},
                 {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [bos], "tokens": ["<s>"]}},
    }  # fmt: skip
    (out / "tokenizer.json").write_text(json.dumps(pipeline, ensure_ascii=False))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "backend": "tokenizers",
                "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}  # fmt: skip
    write_json(out / "tokenizer_config.json", settings)
    return bos + 1


def write_toy_llm(t5: Path, out: Path, seed: int = 0) -> dict:
    """Writes OUT (config.json, model.safetensors in float16, the tokenizer); returns the config."""
    with atomic_path(out) as staging:
        staging.mkdir()
        vocab_size = write_tokenizer(t5, staging)
        config = LLAMA | {"vocab_size": vocab_size, "bos_token_id": vocab_size - 1,
                          "eos_token_id": 1}  # fmt: skip
        model = DecoderLLM(LLMConfig.from_dict(config))
        params = model.init(jax.random.key(seed), jnp.zeros((1, 1), jnp.int32))["params"]
        write_model(staging, config, params, "model")
    return config


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m toyworld.toy_llm", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--t5", type=Path, default=Path("models/toy/t5"), help="the toy T5")
    parser.add_argument("--out", type=Path, required=True, help="the folder to write")
    parser.add_argument("--seed", type=int, default=0, help="of the random weights")
    args = parser.parse_args()
    config = write_toy_llm(args.t5, args.out, args.seed)
    print(f"wrote {args.out}: a random {config['num_hidden_layers']}-layer Llama of width "
          f"{config['hidden_size']}, {config['vocab_size']} tokens")  # fmt: skip


if __name__ == "__main__":
    main()
