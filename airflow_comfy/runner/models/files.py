"""Model files: where a workflow's file names point, and how their tensors are read.

Every file name a workflow gives (``ckpt_name``, ``lora_name`` ...) is resolved inside one sub-folder of a
ComfyUI-style models root (``checkpoints/``, ``vae/``, ``loras/``, ``controlnet/``, ``upscale_models/``,
``embeddings/``) and must stay there: absolute paths, ``..`` and symlinks that lead outside the models root
are refused. Names may contain sub-folders (``sd15/model.safetensors``; ``\\`` is read as ``/``).

Only safetensors are read by default. Pickle-based files (``.ckpt``, ``.pt``, ``.pth``, ``.bin``) can run
code when unpickled: they are refused unless ``allow_pickle=True``, and even then read with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import Any

import torch

MODEL_FOLDERS = ("checkpoints", "vae", "loras", "controlnet", "upscale_models", "embeddings")
"""The sub-folders of a models root that workflow file names are resolved in."""

SAFETENSORS_EXTENSIONS = (".safetensors", ".sft")
PICKLE_EXTENSIONS = (".ckpt", ".pt", ".pth", ".bin")
MODEL_EXTENSIONS = SAFETENSORS_EXTENSIONS + PICKLE_EXTENSIONS


class ModelFileError(ValueError):
    """A model file is missing, outside its folder, unreadable, or of a kind the runner does not load.

    The message names the folder and the file; retrying cannot help."""


# --- resolving names ---------------------------------------------------------------------------------------


def _clean_name(folder: str, name: str) -> PurePosixPath:
    if not isinstance(name, str) or not name.strip():
        raise ModelFileError(f"{folder}: empty model file name")
    text = name.replace("\\", "/")
    rel = PurePosixPath(text)
    if rel.is_absolute() or text.startswith("/") or re.match(r"^[A-Za-z]:(/|$)", text):
        raise ModelFileError(f"{folder}: {name!r} is an absolute path; give a name inside the {folder}/ folder")
    if any(part == ".." for part in rel.parts):
        raise ModelFileError(f"{folder}: {name!r} leaves the {folder}/ folder ('..' is not allowed)")
    parts = [part for part in rel.parts if part not in ("", ".")]
    if not parts:
        raise ModelFileError(f"{folder}: empty model file name")
    return PurePosixPath(*parts)


def _inside(path: Path, base: Path) -> bool:
    try:
        path.relative_to(base)
    except ValueError:
        return False
    return True


def list_model_files(models_root: str | os.PathLike[str], folder: str, *, limit: int | None = None) -> list[str]:
    """The model files of ``models_root/folder`` as workflow names (``sub/name.safetensors``), sorted.

    Diffusers folders (a directory with ``model_index.json``) count as one entry; other directories are
    searched recursively for files with a model extension."""
    base = Path(models_root) / folder
    found: list[str] = []
    if not base.is_dir():
        return found
    for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
        here = Path(dirpath)
        rel_dir = here.relative_to(base)
        if (here / "model_index.json").is_file() and here != base:
            found.append(rel_dir.as_posix())
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in filenames:
            if filename.lower().endswith(MODEL_EXTENSIONS):
                found.append((rel_dir / filename).as_posix() if rel_dir.parts else filename)
    found.sort()
    return found[:limit] if limit is not None else found


def resolve_model_file(
    models_root: str | os.PathLike[str], folder: str, name: str, *, allow_dir: bool = False
) -> Path:
    """The path of ``name`` inside ``models_root/folder``, checked to exist and to stay inside the models root.

    ``allow_dir``: a diffusers folder (with ``model_index.json``) is accepted as well (checkpoints)."""
    if folder not in MODEL_FOLDERS:
        raise ModelFileError(f"unknown model folder {folder!r} (one of {', '.join(MODEL_FOLDERS)})")
    rel = _clean_name(folder, name)
    root = Path(models_root)
    base = root / folder
    path = base.joinpath(*rel.parts)
    if not path.exists():
        available = list_model_files(root, folder)
        shown = ", ".join(available[:8]) if available else "none"
        more = f" (and {len(available) - 8} more)" if len(available) > 8 else ""
        raise ModelFileError(f"{folder}: model file {name!r} not found in {base}; available: {shown}{more}")
    real = path.resolve()
    allowed = [root.resolve(), base.resolve()]
    if not any(_inside(real, b) for b in allowed):
        raise ModelFileError(f"{folder}: {name!r} resolves to {real}, outside the models folder {root}")
    if path.is_dir():
        if allow_dir and (path / "model_index.json").is_file():
            return path
        raise ModelFileError(f"{folder}: {name!r} is a directory, not a model file"
                             + (" (a diffusers folder needs model_index.json)" if allow_dir else ""))
    if not path.name.lower().endswith(MODEL_EXTENSIONS):
        raise ModelFileError(f"{folder}: {name!r} is not a model file (expected one of "
                             f"{', '.join(MODEL_EXTENSIONS)})")
    return path


def models_root_of(path: Path) -> Path | None:
    """The models root above ``path`` (the parent of its ``checkpoints/``, ``vae/`` ... folder), if any."""
    for parent in path.parents:
        if parent.name in MODEL_FOLDERS:
            return parent.parent
    return None


# --- reading tensors -----------------------------------------------------------------------------------------


def is_pickle_file(path: Path) -> bool:
    return path.name.lower().endswith(PICKLE_EXTENSIONS)


def pickle_refused(path: Path) -> ModelFileError:
    return ModelFileError(
        f"{_label(path)}: refusing to load a pickle-based model file ({path.suffix}): unpickling can run "
        f"arbitrary code. Convert it to .safetensors, or allow pickle files explicitly (allow_pickle / "
        f"--allow-pickle; they are then read with torch.load(weights_only=True))")


def _label(path: Path) -> str:
    """``folder/name`` for messages (the path relative to its models sub-folder when there is one)."""
    for parent in path.parents:
        if parent.name in MODEL_FOLDERS:
            return f"{parent.name}/{path.relative_to(parent).as_posix()}"
    return str(path)


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "params_ema", "params", "model"):
            inner = obj.get(key)
            if isinstance(inner, dict) and inner and all(isinstance(k, str) for k in inner):
                return _unwrap(inner, path)
        tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
    raise ModelFileError(f"{_label(path)}: no tensors found in the file")


class TensorReader:
    """Reads the tensors of one model file, counting what it read (to check that only the needed parts are).

    ``keys`` lists every tensor name; ``shape(key)`` costs no read; ``get(key)`` and ``read(prefix)`` read.
    ``tensors_read`` counts distinct tensors (one read twice counts once)."""

    def __init__(self, path: Path, *, allow_pickle: bool = False) -> None:
        self.path = path
        self._read_keys: set[str] = set()
        self._handle: Any = None
        self._pickled: dict[str, torch.Tensor] | None = None
        self.metadata: dict[str, str] = {}
        if is_pickle_file(path):
            if not allow_pickle:
                raise pickle_refused(path)
            try:
                try:
                    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError:  # legacy (non-zip) format: no mmap
                    obj = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any failure is an unreadable file
                raise ModelFileError(f"{_label(path)}: cannot read the pickle file (loaded with "
                                     f"weights_only=True): {exc}") from exc
            self._pickled = _unwrap(obj, path)
            self.keys: list[str] = list(self._pickled)
            return
        from safetensors import safe_open

        try:
            self._handle = safe_open(str(path), framework="pt", device="cpu")
            self.keys = list(self._handle.keys())
            self.metadata = dict(self._handle.metadata() or {})
        except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError
            raise ModelFileError(f"{_label(path)}: not a valid safetensors file ({exc})") from exc

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._handle = None
        self._pickled = None

    def __contains__(self, key: str) -> bool:
        return key in self._key_set

    @property
    def _key_set(self) -> set[str]:
        cached = getattr(self, "_keys_cache", None)
        if cached is None:
            cached = set(self.keys)
            self._keys_cache = cached
        return cached

    def shape(self, key: str) -> tuple[int, ...]:
        if self._pickled is not None:
            return tuple(self._pickled[key].shape)
        try:
            return tuple(self._handle.get_slice(key).get_shape())
        except Exception as exc:  # noqa: BLE001
            raise ModelFileError(f"{_label(self.path)}: cannot read tensor {key!r}: {exc}") from exc

    def shapes(self, keys: Iterable[str] | None = None) -> dict[str, tuple[int, ...]]:
        return {k: self.shape(k) for k in (self.keys if keys is None else keys)}

    @property
    def tensors_read(self) -> int:
        return len(self._read_keys)

    def get(self, key: str) -> torch.Tensor:
        self._read_keys.add(key)
        if self._pickled is not None:
            return self._pickled[key]
        try:
            return self._handle.get_tensor(key)
        except Exception as exc:  # noqa: BLE001
            raise ModelFileError(f"{_label(self.path)}: cannot read tensor {key!r}: {exc}") from exc

    def read(self, select: str | Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
        """The tensors whose name starts with ``select`` (a prefix) or passes it (a predicate); all if None."""
        if select is None:
            keys = list(self.keys)
        elif isinstance(select, str):
            keys = [k for k in self.keys if k.startswith(select)]
        else:
            keys = [k for k in self.keys if select(k)]
        return {k: self.get(k) for k in keys}


def read_state_dict(path: str | os.PathLike[str], *, allow_pickle: bool = False,
                    select: str | Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a model file (or those ``select`` picks), on the CPU."""
    with TensorReader(Path(path), allow_pickle=allow_pickle) as reader:
        return reader.read(select)


def read_by_layout(path: Path, label: str, detect: Callable[[Iterable[str]], tuple[str, str]], *,
                   allow_pickle: bool = False, parts: tuple[str, ...] = ("",)
                   ) -> tuple[str, dict[str, torch.Tensor], dict[str, str]]:
    """A model file whose keys may sit under a prefix: ``detect`` tells its layout, ``(kind, prefix)``, from the
    keys alone (its :class:`ModelFileError` is relabelled with ``label``, the file), then the tensors under the
    prefix whose rest starts with one of ``parts`` are read, each once, the prefix stripped. Returns the kind, the
    tensors and the file's metadata."""
    with TensorReader(path, allow_pickle=allow_pickle) as reader:
        try:
            kind, prefix = detect(reader.keys)
        except ModelFileError as exc:
            raise ModelFileError(f"{label}: {exc}") from None
        tensors = reader.read(lambda k: k.startswith(prefix) and k[len(prefix):].startswith(parts))
        metadata = reader.metadata
    return kind, {k[len(prefix):]: v for k, v in tensors.items()}, metadata


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (empty for pickle files)."""
    p = Path(path)
    if is_pickle_file(p):
        return {}
    with TensorReader(p) as reader:
        return reader.metadata


# --- hashing -------------------------------------------------------------------------------------------------

FileVersion = tuple[int, int, int, int, int]
"""``(st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns)``: one version of one file. Writing a file in place
changes its ctime even when its size stays and its mtime is set back (ctime cannot be set), and replacing it
(a rename over it) gives a new inode, so a new version always gets a new tuple."""

_SHA_CACHE: dict[FileVersion | tuple[tuple[str, FileVersion], ...], str] = {}
_SHA_LOCK = threading.Lock()


def _version(st: os.stat_result) -> FileVersion:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def file_version(path: Path) -> FileVersion | tuple[tuple[str, FileVersion], ...]:
    """What :func:`sha256_of` remembers a hash by: the :data:`FileVersion` of a file; for a folder, its files'
    relative paths with their versions (sorted). One ``stat`` per file: no reading."""
    real = path.resolve()
    if real.is_dir():
        return tuple((f.relative_to(real).as_posix(), _version(f.stat()))
                     for f in sorted(real.rglob("*")) if f.is_file())
    return _version(real.stat())


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_of(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a model file (hex). For a diffusers folder: the SHA-256 of the sorted
    ``relative-path  sha256`` lines of its files.

    The process remembers each hash by the file's version (:func:`file_version`), so a file is read once per
    version however many runs, names or paths use it: the run snapshot (:func:`record_model_file`) and the
    model caches' keys (:func:`file_key`) share this one hash."""
    p = Path(path)
    version = file_version(p)
    with _SHA_LOCK:
        cached = _SHA_CACHE.get(version)
    if cached is not None:
        return cached
    real = p.resolve()
    if real.is_dir():
        lines = [f"{f.relative_to(real).as_posix()}  {sha256_of(f)}"
                 for f in sorted(real.rglob("*")) if f.is_file()]
        value = hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()
    else:
        value = _sha256_file(real)
    with _SHA_LOCK:
        _SHA_CACHE[version] = value
    return value


def file_key(path: Path) -> str:
    """What the model caches key a file by: its content (``sha256:<hex>``), not its name or path. The same
    file under two names shares one cache entry, and a file changed in place is loaded again, whatever its
    mtime says. Costs a ``stat`` once the process has hashed this version of the file (the run snapshot
    already does, before every load)."""
    return f"sha256:{sha256_of(path)}"


def write_json(path: Path, data: Any) -> None:
    """Deterministic JSON (sorted keys, trailing newline): used for shipped configs and the demo files."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


# --- run contexts -----------------------------------------------------------------------------------------


def run_settings(context: Any) -> tuple[Path, bool, torch.device | str, torch.dtype, torch.dtype]:
    """``(models_root, allow_pickle, device, dtype, vae_dtype)`` of a run context: the VAE runs in fp32, or in
    bf16 when the run is bf16."""
    root = Path(context.models_root)
    allow_pickle = bool(getattr(context, "allow_pickle", False))
    device = getattr(context, "device", "cpu")
    dtype = getattr(context, "dtype", torch.float32) or torch.float32
    vae_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    return root, allow_pickle, device, dtype, vae_dtype


def record_model_file(context: Any, folder: str, name: str, path: Path) -> None:
    """Add ``folder/name -> sha256`` to the run's snapshot (``context.model_files``), when it keeps one."""
    files = getattr(context, "model_files", None)
    if files is not None:
        files[f"{folder}/{name}"] = sha256_of(path)

