"""Model locations: a local folder, or a Hugging Face id resolved through huggingface_hub's cache.

``resolve(location, layout=...)`` turns what a user typed after ``--model`` (or a critic option) into a
local folder:

* an existing path is returned as it is (``~`` expanded); nothing is looked up;
* ``org/name`` or ``org/name@revision`` (a branch, tag or commit) that is not a local path is a Hub id:
  ``huggingface_hub.snapshot_download`` returns its snapshot folder in the cache (``HF_HUB_CACHE``, or
  ``HF_HOME``/hub, or ``~/.cache/huggingface/hub``), downloading the missing files when online. With
  ``HF_HUB_OFFLINE=1`` (read when called, not when huggingface_hub was imported) nothing is downloaded:
  the cached snapshot of the revision (``refs/<revision>`` -> ``snapshots/<commit>``) is used, or one
  :class:`HubError` line says how to download it.

Only what the loaders read is fetched (``allow_patterns``): configs, tokenizer files and safetensors
weights - never pickle weights (``.bin``, ``.ckpt``, ``.pt``), nor a pipeline repository's top-level
single-file checkpoints, nor its ``non_ema`` / ``ema`` / ``fp16`` weight variants (online, the ``fp16``
variant of a component is fetched when it is that component's only safetensors file).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

# what a diffusers pipeline folder's loaders read: one subfolder per component
PIPELINE_CONFIGS = ["model_index.json", "adjointdpm.json", "*/*.json", "*/*.txt", "*/*.model"]
PIPELINE_PATTERNS = [*PIPELINE_CONFIGS, "*/*.safetensors"]
# what a transformers model folder's loaders read (critics)
MODEL_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors"]
IGNORED = ["*non_ema*", "*.ema.*", "*.fp16.*", "*fp16.json"]
LAYOUTS = {"pipeline": PIPELINE_PATTERNS, "model": MODEL_PATTERNS}

_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]*[A-Za-z0-9_])(?:@(?P<revision>[\w./-]+))?$")


class HubError(RuntimeError):
    """A location is neither a local path nor a Hub id that can be resolved; the message says what to do."""


def parse_hub_id(location) -> tuple[str, str | None] | None:
    """(repo id, revision or None) when ``location`` is written ``org/name[@revision]``, else None."""
    m = _HUB_ID.match(str(location))
    if m is None or ".." in m["repo"]:
        return None
    return m["repo"], m["revision"]


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (1/true/yes/on)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cache_dir() -> Path:
    """The Hub cache as set now: ``HF_HUB_CACHE``, else ``HF_HOME``/hub, else ``~/.cache/huggingface/hub``."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")  # (the older name)
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def resolve(location, *, layout: str = "pipeline", what: str = "--model") -> Path:
    """The local folder (or file) of ``location``: the path itself if it exists, else a Hub id's snapshot."""
    path = Path(location).expanduser()
    if path.exists():
        return path
    hub = parse_hub_id(location)
    if hub is None:
        raise HubError(f"{what} {location} does not exist (give a local path or a Hugging Face id org/name[@revision])")
    return snapshot(*hub, layout=layout, what=what)


def weight_files(files: list[str]) -> list[str]:
    """The component weights to fetch from a pipeline repository's ``files``: in each component folder its
    plain safetensors files (no ``non_ema`` / ``ema`` / ``fp16`` variant), or its ``fp16`` ones when it
    has nothing else; never the top-level single-file checkpoints."""
    from huggingface_hub.utils import filter_repo_objects

    by_folder: dict[str, list[str]] = {}
    for f in filter_repo_objects(files, allow_patterns=["*/*.safetensors", "*/*.safetensors.index.fp16.json"],
                                 ignore_patterns=["*non_ema*", "*.ema.*"]):
        by_folder.setdefault(os.path.dirname(f), []).append(f)
    chosen = []
    for names in by_folder.values():
        plain = [f for f in names if "fp16." not in f]
        chosen += plain or names
    return sorted(chosen)


def snapshot(repo_id: str, revision: str | None = None, *, layout: str = "pipeline", what: str = "--model") -> Path:
    """The cached snapshot folder of ``repo_id`` at ``revision`` (default main), downloaded when online."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    label = repo_id + (f"@{revision}" if revision else "")
    offline = is_offline()
    allow, ignore = list(LAYOUTS[layout]), (IGNORED if layout == "pipeline" else None)
    if not offline and layout == "pipeline":
        files = _repo_files(repo_id, revision)
        if files is not None:  # (else snapshot_download looks in the cache, and says why it cannot)
            allow, ignore = [*PIPELINE_CONFIGS, *weight_files(files)], None
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir(), local_files_only=offline,
                                   allow_patterns=allow, ignore_patterns=ignore)
    except LocalEntryNotFoundError:
        if offline:
            raise HubError(f"{what} {label} is no local path, nor in the Hugging Face cache {cache_dir()}, and "
                           f"HF_HUB_OFFLINE=1 forbids downloading it: run `hf download {repo_id}"
                           f"{f' --revision {revision}' if revision else ''}` online, or unset HF_HUB_OFFLINE") from None
        raise HubError(f"{what} {label} is no local path, nor in the Hugging Face cache {cache_dir()}, and the Hub "
                       "cannot be reached: check the connection, or download it where the Hub can be reached") from None
    except RevisionNotFoundError:
        raise HubError(f"{what} {label}: the Hub has no revision {revision!r} of {repo_id}") from None
    except (RepositoryNotFoundError, GatedRepoError) as e:
        kind = "is gated (accept its licence on the Hub and log in: hf auth login)" if isinstance(e, GatedRepoError) \
            else "is no local path, and no Hub repository (or a private one: log in with hf auth login)"
        raise HubError(f"{what} {label} {kind}") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(f"{what} {label}: cannot fetch it from the Hugging Face Hub ({first})") from None
    return Path(folder)


def _repo_files(repo_id: str, revision: str | None) -> list[str] | None:
    """The repository's file list from the Hub (None when it cannot be listed now)."""
    from huggingface_hub import HfApi

    try:
        return list(HfApi().list_repo_files(repo_id, revision=revision))
    except Exception:  # noqa: BLE001 - snapshot_download below meets the same error and reports it
        return None
