"""Whether a model the run names (the base model, the CLIP hardness scorer) can be loaded here, found out in
seconds, before any long work, and said in one line.

transformers retries an unreachable hub for every file it looks for (over two minutes for a processor on a
machine without network) and then reports a paragraph. :func:`check_available` asks once, with a short timeout:
a local folder must exist and hold ``config.json``; a hub id must be in the local cache or answer a single request
for its ``config.json``. What fails becomes a :class:`ModelUnavailable` (a :class:`UserError`: the run ends with
``user_error`` and this message, its traceback only in the log) naming the reason: a missing folder, an
unreachable hub, a gated or unknown repository, a missing revision. :func:`unavailable_reason` gives the same one
line for an error a load raised anyway.
"""

from __future__ import annotations

import os
from pathlib import Path

from dama_engine.errors import UserError

PROBE_TIMEOUT_S = 5.0
CONFIG_FILE = "config.json"

OFFLINE = "the machine cannot reach the Hugging Face hub and has no copy in its model cache"
GATED = "it is gated on the Hugging Face hub: accept its terms there and give the workers a token (HF_TOKEN)"
NOT_ON_HUB = "no such model on the Hugging Face hub (or it is private: give the workers a token, HF_TOKEN)"
NO_REVISION = "the hub repository has no such revision"
NO_CONFIG = f"the repository has no {CONFIG_FILE}: not a transformers model"


class ModelUnavailable(UserError):
    """A model or scorer the run names cannot be loaded on this machine; the message is one line."""


def looks_like_path(name: str) -> bool:
    """A name meant as a folder: absolute, relative with ``./`` or ``../``, from home, or more than one ``/``
    (a hub id is ``namespace/name``)."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def check_available(name: str, *, what: str, revision: str | None = None) -> None:
    """Raise :class:`ModelUnavailable` when ``name`` (a folder or a hub id) cannot be loaded here; return quickly
    when it can (a folder with ``config.json``, a hub id in the local cache, or one the hub serves)."""
    reason = _problem(name, revision)
    if reason is not None:
        raise ModelUnavailable(f"{what} {name!r} could not be loaded: {reason}")


def _problem(name: str, revision: str | None) -> str | None:
    folder = Path(name).expanduser()
    if folder.is_dir():
        return None if (folder / CONFIG_FILE).is_file() else f"the folder {name} has no {CONFIG_FILE}"
    if looks_like_path(name):
        return f"there is no folder {name} on this machine"
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache

    try:
        if isinstance(try_to_load_from_cache(name, CONFIG_FILE, revision=revision), str):
            return None  # in the cache: transformers falls back to it when the hub is unreachable
    except Exception as error:  # not a valid repo id
        return unavailable_reason(error)
    if constants.HF_HUB_OFFLINE:
        return OFFLINE + " (HF_HUB_OFFLINE is set)"
    try:
        get_hf_file_metadata(hf_hub_url(name, CONFIG_FILE, revision=revision), timeout=PROBE_TIMEOUT_S)
    except Exception as error:
        return unavailable_reason(error)
    return None


def unavailable_reason(error: BaseException) -> str:
    """One line saying why a load failed, from the error and the errors it was raised from (huggingface_hub's
    typed errors, connection errors), else the first line of its message."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    names = {cls.__name__ for item in chain for cls in type(item).__mro__}
    if "GatedRepoError" in names:
        return GATED
    if "RevisionNotFoundError" in names:
        return NO_REVISION
    if "RepositoryNotFoundError" in names:
        return NOT_ON_HUB
    if "EntryNotFoundError" in names and "LocalEntryNotFoundError" not in names:
        return NO_CONFIG
    if "HFValidationError" in names:
        return "not a hub id (namespace/name) nor a folder on this machine"
    offline = {"ConnectError", "ConnectTimeout", "ConnectionError", "TimeoutException", "OfflineModeIsEnabled"}
    text = " ".join(str(item) for item in chain)
    if names & offline or "LocalEntryNotFoundError" in names or "couldn't connect to" in text:
        return OFFLINE
    first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return first[:300]
