"""Where model files come from, as llama-cpp-python's `Llama.from_pretrained` finds them: a GGUF path, an HF repo
of GGUF files (the one matching a quant type, downloaded into the HF cache), or an HF safetensors repo, converted
once into dglocal's cache."""

from __future__ import annotations

import re
from pathlib import Path

from dglocal.errors import ModelError

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "data" / "sudoku.gguf"
SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


def cache_dir() -> Path:
    """Where HF safetensors repos are converted to GGUF, once per repo revision and type."""
    from dglocal.runtime.upstream import cache_dir as dglocal_cache

    return dglocal_cache() / "converted"


# -- model resolution ----------------------------------------------------------------------------------------

def resolve_model(spec: str | None, quant: str = "Q4_K_M", *, converting=None) -> Path:
    """A GGUF path; an HF repo id holding GGUFs (the file matching `quant`, downloaded into the HF cache);
    an HF safetensors repo (converted once into cache_dir(); `converting(message)`, a context manager yielding a
    progress(name, done, total) callback, shows it); None: the built-in default model (the Sudoku model)."""
    if spec is None:
        if not DEFAULT_MODEL.is_file():
            raise ModelError("no default model shipped yet: give a GGUF file or an HF repo id (dglocal run MODEL)")
        return DEFAULT_MODEL
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise ModelError(f"{spec}: not a GGUF file (a checkpoint directory? dglocal convert makes one)")
    if spec.count("/") != 1 or spec.startswith((".", "/", "~")) or spec.endswith(".gguf"):
        raise ModelError(f"{spec}: no such file, and not an HF repo id (owner/name)")
    files = _repo_files(spec)
    ggufs = [f for f in files if f.lower().endswith(".gguf") and "mmproj" not in f.lower()]
    if ggufs:
        return _download_gguf(spec, ggufs, quant)
    if "config.json" in files and any(f.endswith(".safetensors") for f in files):
        return _convert_repo(spec, quant, converting)
    raise ModelError(f"{spec}: the repo holds neither GGUF files nor a safetensors checkpoint")


def _hub_error(spec: str, e: Exception) -> ModelError:
    hint = " (HF_HUB_OFFLINE is set and it is not in the cache)" if _offline() else ""
    first = (str(e).splitlines() or [""])[0]
    return ModelError(f"{spec}: cannot reach the repo{hint}: {type(e).__name__}: {first}")


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _repo_files(spec: str) -> list[str]:
    """The repo's files; offline, those in its cached snapshot."""
    from huggingface_hub import list_repo_files, snapshot_download

    try:
        if _offline():
            root = Path(snapshot_download(spec, local_files_only=True))
            return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        return list_repo_files(spec)
    except Exception as e:  # hub errors are many classes; the message is what the user needs
        raise _hub_error(spec, e) from e


def pick_gguf(ggufs: list[str], quant: str, *, explicit: bool = True) -> list[str]:
    """The GGUF files for `quant` (all shards of a split file), matched on the name, case-insensitively."""
    # a whole type name: Q4_K matches m-Q4_K.gguf, not m-Q4_K_M.gguf
    pattern = re.compile(rf"(?<![a-z0-9]){re.escape(quant.lower())}(?![a-z0-9]|_[a-z0-9])")
    matches = sorted(f for f in ggufs if pattern.search(Path(f).name.lower()))
    if not matches and not explicit and len(ggufs) == 1:
        matches = ggufs
    whole = [f for f in matches if not SPLIT.search(f)]
    if len(whole) > 1:
        raise ModelError(f"several GGUF files match {quant}: {', '.join(whole)}")
    if whole:
        return whole
    if matches:  # a split file: every shard, the first one first
        return matches
    raise ModelError(f"no GGUF for --quant {quant}; the repo has: {', '.join(Path(f).name for f in ggufs)}")


def _download_gguf(spec: str, ggufs: list[str], quant: str) -> Path:
    from huggingface_hub import hf_hub_download

    chosen = pick_gguf(ggufs, quant, explicit=quant.upper() != "Q4_K_M")
    try:  # huggingface_hub draws its own progress bar (stderr) and keeps the file in the HF cache
        paths = [Path(hf_hub_download(spec, f)) for f in chosen]
    except Exception as e:  # noqa: BLE001
        raise _hub_error(spec, e) from e
    return paths[0]


def _convert_repo(spec: str, quant: str, converting=None) -> Path:
    from contextlib import nullcontext

    from .source import resolve_source
    from .writer import convert

    directory = resolve_source(spec)  # downloads the checkpoint; the snapshot folder is named by the commit
    out = cache_dir() / spec.replace("/", "--") / f"{directory.name[:12]}-{quant.lower()}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    message = f"converting {spec} to {quant} (once) into {out}"
    with converting(message) if converting is not None else nullcontext() as progress:
        convert(directory, out, quant, force=True, progress=progress)
    return out
