"""The metadata (key-value fields) of an exported GGUF file.

Two sources:

- ``copy_from_gguf``: every field of the base model's own GGUF (tokenizer, merges, the
  pre-tokenizer tag, chat template, rope), in its order, with ``general.file_type`` set to
  the export's type. This is what makes an export of the built-in SmolLM2 run in llama.cpp
  exactly as the shipped file does.
- ``build_from_model``: a transformers llama model and its tokenizer, as llama.cpp's
  ``convert_hf_to_gguf.py`` builds them (``LlamaModel.set_gguf_parameters`` and
  ``_set_vocab_gpt2``): hyper-parameters from the config, the byte-level BPE vocabulary
  with token types, merges and special ids (``gguf.SpecialVocab``), the chat template,
  and the pre-tokenizer named by the sha256 of the token ids of llama.cpp's check text.
"""

from __future__ import annotations

import json
import tempfile
from hashlib import sha256
from pathlib import Path
from typing import Any

from torch import nn

# llama.cpp convert_hf_to_gguf.py ``get_vocab_base_pre``: the text and the hashes of its
# token ids for the pre-tokenizers of llama-architecture models.
CHECK_TEXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
              '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
              '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
              '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Meta-Llama-3
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral-Nemo
}


def read_gguf(source: Path):
    """The base model's GGUF, parsed once (``gguf.GGUFReader``: ~4 s for SmolLM2's 49k tokens)."""
    import gguf

    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    if arch != "llama":
        raise ValueError(f"the base GGUF {str(source)!r} is a {arch!r} model; GGUF export writes llama models")
    return reader


def gguf_vocab(reader) -> int:
    """The number of tokens of a GGUF file."""
    return len(reader.fields["tokenizer.ggml.tokens"].data)


def gguf_tensor_names(reader) -> list[str]:
    return [t.name for t in reader.tensors]


def copy_from_gguf(reader, gguf_type: str):
    """A ``kv_source`` for ``gguf_write.write``: every field of the base GGUF, file type replaced."""
    import gguf

    from .gguf_write import file_type

    def add(writer) -> None:
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key == "general.architecture":  # header; the writer adds the arch
                continue
            if key == "general.file_type":
                writer.add_file_type(int(file_type(gguf_type)))
                continue
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), kind, sub_type=sub)

    return add


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def _add_hparams(writer, config, gguf_type: str) -> None:
    from .gguf_write import file_type

    n_head = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_head
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(n_head)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or n_head)
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_file_type(int(file_type(gguf_type)))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // n_head:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type")) == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def _looks_special(token: str) -> bool:  # convert_hf_to_gguf.py ``does_token_look_special``
    return token in ("<pad>", "<mask>") or (token.startswith("<|") and token.endswith("|>"))


def _vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int], str]:
    """Tokens, token types and pre-tokenizer name (convert_hf_to_gguf.py ``get_vocab_base``)."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.model).__name__ != "BPE":
        raise ValueError("GGUF export from a transformers folder needs a byte-level BPE tokenizer (tokenizer.json); "
                         f"{type(tokenizer).__name__} is not one")
    digest = sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()
    if digest not in PRE_TOKENIZERS:
        raise ValueError(f"GGUF export: llama.cpp does not know this tokenizer's pre-tokenizer (hash {digest[:12]}); "
                         f"known: {', '.join(sorted(set(PRE_TOKENIZERS.values())))}")
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(reverse) >= vocab_size:
        raise ValueError(f"the tokenizer has token id {max(reverse)}, beyond the model's {vocab_size} embedding rows")
    added = tokenizer.get_added_vocab()
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif token in added:
            special = tokenizer.added_tokens_decoder[i].special or _looks_special(token)
            tokens.append(token if special else token.replace("\u2581", " "))
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(gguf.TokenType.NORMAL)
    return tokens, types, PRE_TOKENIZERS[digest]


def build_from_model(model: nn.Module, tokenizer: Any, gguf_type: str, name: str):
    """A ``kv_source`` for ``gguf_write.write`` built from a transformers llama model."""
    import gguf

    config = model.config
    tokens, types, pre = _vocab(tokenizer, config.vocab_size)
    with tempfile.TemporaryDirectory() as folder:  # SpecialVocab reads merges and ids from files
        tokenizer.save_pretrained(folder)
        special = gguf.SpecialVocab(Path(folder), load_merges=True, n_vocab=len(tokens))
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    special.chat_template = None  # added below, once
    ids = tokenizer("a")["input_ids"]  # what the tokenizer adds on its own, said explicitly to llama.cpp
    special.add_special_token["bos"] = tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id
    if tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id:
        special.add_special_token["eos"] = True
    pre_tokenizer = json.loads(tokenizer.backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    space_prefix = '"add_prefix_space": true' in json.dumps(pre_tokenizer)

    def add(writer) -> None:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        _add_hparams(writer, config, gguf_type)
        writer.add_add_space_prefix(space_prefix)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special.add_to_gguf(writer, quiet=True)
        if template:
            writer.add_chat_template(template)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    return add
