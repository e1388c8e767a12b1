"""builtin://tiny-llama: a small deterministic Llama written as a real Hugging Face directory.

It is built on first use (fixed-seed random weights, a byte-level BPE tokenizer trained on a
built-in English text, a chat template) into the cache folder and then loaded by the same code
as any checkpoint. Its text is nonsense: the weights are random.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

TINY_LLAMA_URI = "builtin://tiny-llama"
TINY_LLAMA_VERSION = "v3"
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
TINY_SHAPE = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)


def cache_dir() -> Path:
    root = os.environ.get("MODELFLEET_CACHE_DIR") or Path.home() / ".cache" / "modelfleet"
    return Path(root) / "models"


def materialize(uri: str = TINY_LLAMA_URI) -> Path:
    """Return the directory of a builtin model, writing it atomically on first use."""
    if uri != TINY_LLAMA_URI:
        from modelfleet.engine.errors import InvalidConfig

        raise InvalidConfig("model", f"unknown builtin model {uri!r} (known: {TINY_LLAMA_URI})")
    target = cache_dir() / f"tiny-llama-{TINY_LLAMA_VERSION}"
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-llama-", dir=target.parent))
    try:
        write_llama_dir(tmp, **TINY_SHAPE, seed=0, tie_word_embeddings=False)
        try:
            os.rename(tmp, target)  # atomic; a racing writer's finished copy wins
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def train_tokenizer(vocab_size: int = 4096):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from modelfleet.engine.corpus import CORPUS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    lines = CORPUS.splitlines()
    tok.train_from_iterator(lines + [w for line in lines for w in line.split()], trainer)
    bos = tok.token_to_id(SPECIALS[0])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIALS[0]} $A", pair=f"{SPECIALS[0]} $A $B", special_tokens=[(SPECIALS[0], bos)]
    )
    return tok


def write_llama_dir(
    path: Path, *, hidden_size: int, intermediate_size: int, num_hidden_layers: int,
    num_attention_heads: int, num_key_value_heads: int, max_position_embeddings: int,
    seed: int = 0, vocab_size: int = 4096, dtype: torch.dtype = torch.float32,
    tie_word_embeddings: bool = True, weights: bool = True,
) -> None:
    """Write a random-weight Llama checkpoint with a real tokenizer into `path`
    (weights=False: config and tokenizer only, for load_format="dummy")."""
    path.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(vocab_size)
    tok.save(str(path / "tokenizer.json"))
    vocab = tok.get_vocab_size()
    bos, eos = tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|eot_id|>")
    end = tok.token_to_id("<|end_of_text|>")
    head_dim = hidden_size // num_attention_heads
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": hidden_size, "intermediate_size": intermediate_size,
        "num_hidden_layers": num_hidden_layers, "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads, "head_dim": head_dim,
        "max_position_embeddings": max_position_embeddings, "vocab_size": vocab,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "tie_word_embeddings": tie_word_embeddings, "bos_token_id": bos, "eos_token_id": [end, eos],
        "torch_dtype": str(dtype).removeprefix("torch."),
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(
        json.dumps({"bos_token_id": bos, "eos_token_id": [end, eos]}, indent=2)
    )
    (path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "model_max_length": max_position_embeddings, "tokenizer_class": "PreTrainedTokenizerFast",
    }, indent=2))
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    if not weights:
        return
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float = 0.02) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(dtype)

    q, kv = num_attention_heads * head_dim, num_key_value_heads * head_dim
    w: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rand(vocab, hidden_size, std=0.5)}
    for i in range(num_hidden_layers):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = rand(q, hidden_size, std=0.1)
        w[p + "self_attn.k_proj.weight"] = rand(kv, hidden_size, std=0.1)
        w[p + "self_attn.v_proj.weight"] = rand(kv, hidden_size, std=0.1)
        w[p + "self_attn.o_proj.weight"] = rand(hidden_size, q, std=0.1)
        w[p + "mlp.gate_proj.weight"] = rand(intermediate_size, hidden_size, std=0.1)
        w[p + "mlp.up_proj.weight"] = rand(intermediate_size, hidden_size, std=0.1)
        w[p + "mlp.down_proj.weight"] = rand(hidden_size, intermediate_size, std=0.1)
        w[p + "input_layernorm.weight"] = torch.ones(hidden_size, dtype=dtype)
        w[p + "post_attention_layernorm.weight"] = torch.ones(hidden_size, dtype=dtype)
    w["model.norm.weight"] = torch.ones(hidden_size, dtype=dtype)
    if not tie_word_embeddings:
        w["lm_head.weight"] = rand(vocab, hidden_size, std=0.1)
    save_file(w, str(path / "model.safetensors"), metadata={"format": "pt"})
