"""Load Hugging Face DLM checkpoints offline: a local directory or the local HF cache, nothing else.

Weights are streamed shard by shard straight into the requested dtype and device on a model built on
the meta device, so the peak resident memory stays near the size of the loaded weights: a bf16 model is
never materialised in fp32 first. Every failure raises `CheckpointError` with the problem and the fix.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from dlmtrt import dtypes
from dlmtrt.errors import DlmtrtError

from .families import aliases, family_of, supported_summary
from .families import get as model_family
from .args import ModelArgs
from .transformer import DiffusionLM, rope_inv_freq

ALIASES: dict[str, str] = aliases()  # every model family's released checkpoints
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
SHIPPED = Path(__file__).resolve().parent.parent / "checkpoints"
# trained by this project (dlmtrt/evals/train.py), committed under checkpoints/: one alias per directory
SHIPPED_ALIASES: dict[str, Path] = {p.name: p for p in sorted(SHIPPED.iterdir()) if (p / "config.json").is_file()} \
    if SHIPPED.is_dir() else {}
_ST_DTYPES: dict[str, torch.dtype] = {  # safetensors dtype tags of unquantised float weights
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
_ST_QUANT: dict[str, torch.dtype] = {"F8_E4M3": torch.float8_e4m3fn, "I8": torch.int8}  # calibrated checkpoints
_CHUNK_BYTES = 64 * 2 ** 20


class CheckpointError(DlmtrtError, RuntimeError):
    """A checkpoint cannot be resolved or loaded; the message says what to do."""


@dataclass
class Checkpoint:
    """A resolved checkpoint directory and what its config files say."""

    path: Path
    source: str  # what the user asked for
    config: dict
    generation_config: dict
    family: str
    args: ModelArgs
    weight_files: list[Path]


def resolve_path(model: str) -> Path:
    """A directory, an alias from ALIASES, or a repo id present in the local HF cache."""
    p = Path(model).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{model} is a file; pass the checkpoint directory that holds config.json")
    if model in SHIPPED_ALIASES:
        if not SHIPPED_ALIASES[model].is_dir():
            raise CheckpointError(f"'{model}' ships inside the dlmtrt package at {SHIPPED_ALIASES[model]}, which is "
                                  "missing: reinstall dlmtrt (`pip install --force-reinstall --no-deps dlmtrt`, or "
                                  "`git checkout -- dlmtrt/checkpoints/` in a source checkout)")
        return SHIPPED_ALIASES[model]
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
    from huggingface_hub.utils import validate_repo_id

    repo = ALIASES.get(model, model)
    try:  # a missing relative path like out/a/b is not a repo id: say so instead of leaking HFValidationError
        validate_repo_id(repo)
        looks_like_repo = "/" in repo and not model.startswith((".", "/", "~"))
    except HFValidationError:
        looks_like_repo = False
    if not looks_like_repo:
        raise CheckpointError(
            f"'{model}' is neither a directory nor a known alias ({', '.join([*ALIASES, *SHIPPED_ALIASES])}) nor an 'org/name' repo id. "
            "Pass a checkpoint directory (for a test model: dlmtrt make-tiny --arch dream --out DIR).")
    cache = constants.HF_HUB_CACHE  # read by huggingface_hub at import time from HF_HUB_CACHE / HF_HOME
    try:
        return Path(snapshot_download(repo, local_files_only=True, cache_dir=cache))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError) as e:
        alias = f"'{model}' ({repo})" if model != repo else f"'{repo}' (no directory of that name exists either)"
        raise CheckpointError(
            f"model {alias} is not in the local Hugging Face cache ({cache}); "
            "this tool never downloads. On a machine with internet run `hf download " + repo + "` "
            "(or `huggingface-cli download " + repo + "`), then copy the cache here or set HF_HUB_CACHE/HF_HOME "
            f"to it, or pass --model /path/to/checkpoint. ({type(e).__name__})") from None


def _read_json(path: Path, what: str) -> dict:
    try:
        d = json.loads(path.read_text())
        if not isinstance(d, dict):
            raise json.JSONDecodeError(f"top level is {type(d).__name__}, not an object", "", 0)
        return d
    except FileNotFoundError:
        raise CheckpointError(f"{what} missing: {path}. Re-download the checkpoint or point --model at the "
                              "directory that contains it") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{what} is corrupt ({path}: {e}); re-download it") from None


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.exists():
        wm = _read_json(index, "shard index").get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise CheckpointError(f"shard index {index} has no weight_map; re-download the checkpoint")
        files = [path / f for f in dict.fromkeys(wm.values())]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{len(missing)} shard(s) listed in {index.name} are missing: "
                                  f"{', '.join(missing)}; the download is incomplete, fetch the missing files")
        return files
    if single.exists():
        return [single]
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    others = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    if shards:
        hint = (f" Found {', '.join(shards[:3])}{', ...' if len(shards) > 3 else ''} but not the index that maps "
                "tensors to them: re-download model.safetensors.index.json.")
    elif others:
        hint = f" Found {', '.join(others)}: convert them to safetensors first."
    else:
        hint = " Re-download the weights, or point --model at the directory that holds them."
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {path}.{hint}")


def open_checkpoint(model: str) -> Checkpoint:
    """Resolve and validate config files without reading any weights."""
    path = resolve_path(model)
    cfg = _read_json(path / "config.json", "config.json")
    gen_path = path / "generation_config.json"
    gen = _read_json(gen_path, "generation_config.json") if gen_path.exists() else {}
    fam = family_of(cfg)
    if fam is None:
        raise CheckpointError(
            f"unknown architecture in {path / 'config.json'}: architectures={cfg.get('architectures')}, "
            f"model_type={cfg.get('model_type')!r}. Supported: {supported_summary()}.")
    try:
        args = fam.args_from_config(cfg, gen)
    except KeyError as e:
        raise CheckpointError(f"config.json of {path} lacks key {e} required for a {fam.FAMILY} model; "
                              "re-download it") from None
    except ValueError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}. This runtime cannot run this checkpoint: it implements "
                              f"the standard {fam.FAMILY} architecture only; use an unmodified {fam.FAMILY} "
                              "checkpoint or a supported one.") from None
    if "mask_token_id" in gen and "mask_token_id" in cfg and gen["mask_token_id"] != cfg["mask_token_id"]:
        raise CheckpointError(
            f"config.json says mask_token_id={cfg['mask_token_id']} but generation_config.json says "
            f"{gen['mask_token_id']} in {path}: which token is the mask is ambiguous; make them agree "
            "(the tokenizer's mask token id is the right value) or re-download the checkpoint")
    return Checkpoint(path, model, cfg, gen, fam.FAMILY, args, _weight_files(path))


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise CheckpointError(f"unknown device '{device}'; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CheckpointError(f"device '{device}' requested but no CUDA GPU is visible to torch; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CheckpointError(f"device '{device}' does not exist: {torch.cuda.device_count()} GPU(s) visible")
    return dev


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    dt = dtype if isinstance(dtype, torch.dtype) else dtypes.lookup(dtype)
    if dt not in dtypes.DTYPES.values():
        raise CheckpointError(f"unsupported dtype '{dtype}'; use one of {', '.join(dtypes.DTYPE_NAMES)}")
    if dt == torch.bfloat16 and device.type == "cuda" and not _native_bf16(device):
        name = torch.cuda.get_device_name(device)
        cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
        raise CheckpointError(f"{name} (compute capability {cap}) cannot run bfloat16 natively (needs 8.0+); "
                              "use --dtype float16")
    return dt


def _native_bf16(device: torch.device) -> bool:
    """Capability of the requested GPU. Not torch.cuda.is_bf16_supported(): by default it says True on pre-Ampere
    GPUs (it counts slow emulation) and it asks about the current device, not the requested one."""
    return bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8


def _set_tensor(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    setattr(mod, attr, torch.nn.Parameter(value, requires_grad=False))


def _data_offsets(shard: Path) -> dict[str, int]:
    """Absolute file offset of each tensor's bytes, from the safetensors header (8-byte length + JSON), which
    safe_open does not expose; only called after safe_open has validated the file."""
    with open(shard, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(n))
    return {k: 8 + n + v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def _read_chunked(fh, start: int, shape: torch.Size, src: torch.dtype, dtype: torch.dtype,
                  device: torch.device) -> torch.Tensor:
    """Fill a preallocated tensor from the file with plain reads. Same dtype on CPU: read straight into it.
    Otherwise (bf16 file -> fp32 model, or a GPU upload) go through one _CHUNK_BYTES buffer, so no full-size
    source copy of a large tensor (the 150k-row embedding) ever sits next to its converted copy.

    Not safetensors' get_tensor: its default mmap backend returns views of the mapped file (the "loaded"
    model becomes resident only on first use, stays tied to the file, and the open shard's touched pages add
    to RSS); its pread backend (>= 0.8) reads whole tensors even for a slice, and was slower than this
    (1B bf16 model: 4.1-4.4 s vs 3.0-3.8 s) at the same peak."""
    out = torch.empty(shape, dtype=dtype, device=device)
    flat = out.view(-1)
    direct = device.type == "cpu" and src == dtype
    step = flat.numel() if direct else max(1, _CHUNK_BYTES // src.itemsize)
    buf = None if direct else torch.empty(min(step, flat.numel()), dtype=src)
    fh.seek(start)
    for i in range(0, flat.numel(), step):
        j = min(i + step, flat.numel())
        dst = flat[i:j] if direct else buf[: j - i]
        mv = memoryview(dst.view(torch.uint8).numpy())
        got = 0
        while got < len(mv):
            n = fh.readinto(mv[got:])
            if not n:
                raise CheckpointError(f"corrupt safetensors file {fh.name}: it ends inside a tensor; re-download it")
            got += n
        if not direct:
            flat[i:j].copy_(dst)
    return out


@dataclass(frozen=True)
class TensorRef:
    """Where one weight lives: its shard, its name there, the file offset of its bytes, shape and stored dtype."""

    shard: Path
    key: str
    offset: int
    shape: torch.Size
    dtype: torch.dtype


def quantization_format(ck: Checkpoint) -> str | None:
    """The 8-bit format of a checkpoint written by `dlmtrt calibrate` (config.json `quantization_config`), or None.
    Another tool's quantised checkpoint is refused with what to do."""
    qc = ck.config.get("quantization_config")
    if qc is None:
        return None
    from .quantized import FORMATS
    if not isinstance(qc, dict) or qc.get("quant_method") != "dlmtrt" or qc.get("format") not in FORMATS:
        raise CheckpointError(
            f"{ck.path / 'config.json'} describes a quantised checkpoint this runtime does not read "
            f"(quantization_config={qc!r}); load the original bf16 weights, or quantise them with "
            f"`dlmtrt calibrate --format {'|'.join(FORMATS)}`")
    return qc["format"]


def skeleton(ck: Checkpoint) -> DiffusionLM:
    """The model of `ck` on the meta device, with `QuantLinear`s where a calibrated checkpoint has them."""
    with torch.device("meta"):
        model = DiffusionLM(ck.args)
    fmt = quantization_format(ck)
    if fmt is not None:
        from .quantized import swap_in
        swap_in(model, fmt, quantized_layers(ck, model))
    return model


def quantized_layers(ck: Checkpoint, model: DiffusionLM) -> list[str]:
    """The linears of `model` (built from `ck.args`) that the calibrated checkpoint `ck` holds in 8 bits: the
    projections but those `calibrate --keep-blocks` left in the model dtype (config.json
    `quantization_config.unquantized`, checked against the model's projections), and the head if
    `quantization_config.head` (`calibrate --quantize-head`)."""
    from .quantized import quantizable_linears
    qc = ck.config.get("quantization_config") or {}
    names = qc.get("unquantized") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CheckpointError(f"{ck.path / 'config.json'}: quantization_config.unquantized must be a list of layer "
                              f"names, got {names!r}; calibrate again")
    head = qc.get("head", False)
    if not isinstance(head, bool):
        raise CheckpointError(f"{ck.path / 'config.json'}: quantization_config.head must be true or false, got "
                              f"{head!r}; calibrate again")
    if head and ck.args.tie_word_embeddings:
        raise CheckpointError(f"{ck.path / 'config.json'}: quantization_config.head is set but the head shares the "
                              "embedding's weights (tied), which stay unquantised; calibrate again")
    known = quantizable_linears(model, head)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise CheckpointError(f"{ck.path / 'config.json'}: quantization_config.unquantized names layers this model "
                              f"does not have ({unknown[0]}, ...); calibrate again")
    return [n for n in known if n not in names]


def tensor_index(ck: Checkpoint) -> dict[str, TensorRef]:
    """Every weight of the model under our parameter names, validated against the config (names, shapes, dtypes,
    completeness) from the safetensors headers alone: nothing is read. The loader and the ONNX exporter use it."""
    fam = model_family(ck.family)
    model = skeleton(ck)
    quantized = {n: p.dtype for n, p in model.named_parameters() if p.dtype in _ST_QUANT.values()}
    expected = {n: p.shape for n, p in model.named_parameters()}
    if ck.args.tie_word_embeddings:
        expected.pop("lm_head.weight")
    index: dict[str, TensorRef] = {}
    for shard in ck.weight_files:
        try:
            with safe_open(str(shard), framework="pt", device="cpu") as f:
                offsets = _data_offsets(shard)
                for key in f.keys():
                    name = fam.checkpoint_to_ours(key)
                    if name.endswith(_IGNORED_SUFFIXES):
                        continue
                    if name not in expected:
                        raise CheckpointError(
                            f"unexpected tensor '{key}' in {shard.name}: it is not part of a {ck.family} model with "
                            "this config.json; config.json and weights do not match, use the config.json that was "
                            "shipped with these weights")
                    sl = f.get_slice(key)
                    shape = torch.Size(sl.get_shape())
                    if shape != expected[name]:
                        raise CheckpointError(
                            f"tensor shape mismatch for '{key}' in {shard.name}: checkpoint has {tuple(shape)}, "
                            f"config.json implies {tuple(expected[name])}; config.json and weights do not match, "
                            "use the config.json that was shipped with these weights")
                    src = _ST_DTYPES.get(sl.get_dtype())
                    if name in quantized:
                        src = _ST_QUANT.get(sl.get_dtype())
                        if src != quantized[name]:
                            raise CheckpointError(
                                f"tensor '{key}' in {shard.name} is stored as {sl.get_dtype()}, but this "
                                f"{quantization_format(ck)} checkpoint needs {quantized[name]}; calibrate again")
                    if src is None:
                        raise CheckpointError(
                            f"tensor '{key}' in {shard.name} is stored as {sl.get_dtype()}; only unquantised "
                            f"checkpoints ({', '.join(_ST_DTYPES)}) are supported, use the original bf16 weights")
                    index[name] = TensorRef(shard, key, offsets[key], shape, src)
        except SafetensorError as e:
            raise CheckpointError(f"corrupt safetensors file {shard}: {e}; re-download it") from None
    missing = sorted(set(expected) - set(index))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"checkpoint {ck.path} lacks {len(missing)} tensor(s): {', '.join(missing[:5])}{more}; "
                              "the download is incomplete or the config does not match the weights")
    return index


def read_tensor(ref: TensorRef, dtype: torch.dtype, device: torch.device | str = "cpu", fh=None) -> torch.Tensor:
    """One weight, converted to `dtype` on `device` while reading (see _read_chunked)."""
    if fh is not None:
        return _read_chunked(fh, ref.offset, ref.shape, ref.dtype, dtype, torch.device(device))
    with open(ref.shard, "rb") as f:
        return _read_chunked(f, ref.offset, ref.shape, ref.dtype, dtype, torch.device(device))


def load_weights(ck: Checkpoint, dtype: torch.dtype, device: torch.device, progress=None) -> DiffusionLM:
    """Build the model on the meta device and fill it tensor by tensor from the shards. safe_open only
    validates and describes them; the bytes are read, never mapped (see _read_chunked), so peak RSS stays
    near the loaded bytes plus one _CHUNK_BYTES buffer, and the model does not depend on the files later."""
    index = tensor_index(ck)
    model = skeleton(ck)
    fmt = quantization_format(ck)
    if fmt is not None and device.type == "cuda":
        from .quantized import fp8_supported
        if fmt == "fp8" and not fp8_supported(device):
            warnings.warn(f"{torch.cuda.get_device_name(device)} has no FP8 tensor cores (compute capability 8.9+): "
                          f"the fp8 layers of {ck.path.name} run emulated above 4 rows (dequantised, then a "
                          f"{dtype} product): correct, not faster than the unquantised model", stacklevel=2)
    for shard in ck.weight_files:
        with open(shard, "rb") as fh:
            for name, ref in index.items():
                if ref.shard != shard:
                    continue
                keep = ref.dtype in _ST_QUANT.values() or name.endswith(("weight_scale", "input_scale"))
                _set_tensor(model, name, read_tensor(ref, ref.dtype if keep else dtype, device, fh))
                if progress is not None:
                    progress()
    model.register_buffer("inv_freq", rope_inv_freq(ck.args, device), persistent=False)
    model.tie_weights()
    return model.eval()


def count_tensors(ck: Checkpoint) -> int:
    n = 0
    for shard in ck.weight_files:
        try:
            with safe_open(str(shard), framework="pt", device="cpu") as f:
                n += len(list(f.keys()))
        except SafetensorError as e:
            raise CheckpointError(f"corrupt safetensors file {shard}: {e}; re-download it") from None
    return n


def load_tokenizer(ck: Checkpoint):
    """The checkpoint's fast tokenizer, without trust_remote_code (Dream ships a custom class we do not need)."""
    from transformers import PreTrainedTokenizerFast
    tj = ck.path / "tokenizer.json"
    if not tj.exists():
        raise CheckpointError(f"tokenizer.json missing in {ck.path}; copy the tokenizer files of the checkpoint there")
    try:
        tok = PreTrainedTokenizerFast.from_pretrained(str(ck.path))
    except Exception as e:  # tokenizers raises plain Exception subclasses for corrupt files
        raise CheckpointError(f"cannot load the tokenizer in {ck.path}: {e}; re-download tokenizer.json") from None
    mask_id = tok.convert_tokens_to_ids(tok.mask_token) if tok.mask_token else None
    if mask_id != ck.args.mask_token_id:
        raise CheckpointError(
            f"tokenizer in {ck.path} does not match the model: its mask token is {tok.mask_token!r} (id {mask_id}) "
            f"but the config says mask_token_id={ck.args.mask_token_id}; use the tokenizer shipped with the weights")
    return tok


def load(model: str, dtype: str | torch.dtype = "float32", device: str | torch.device | None = "cpu",
         progress=None):
    """(model, tokenizer, checkpoint) for a directory, alias or cached repo id."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    ck = open_checkpoint(model)
    tok = load_tokenizer(ck)
    return load_weights(ck, dt, dev, progress), tok, ck
