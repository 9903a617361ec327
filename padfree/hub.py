"""Models by name: a Hugging Face Hub ID (``org/name`` or ``name``) turned into a local directory, the snapshot of
huggingface_hub's cache, with only the files padfree reads downloaded (configs, tokenizer, sentence-transformers
modules, safetensors weights; PyTorch ``.bin`` weights only for a repo without safetensors; never ``onnx/`` or
``openvino/``). An existing directory is used as it is. huggingface_hub's settings apply as they are:
``HF_HOME`` / ``HF_HUB_CACHE`` (where the cache is), ``HF_HUB_OFFLINE`` (the cache only), ``HF_ENDPOINT``,
``HF_TOKEN``. huggingface_hub is imported only for an ID, not for a directory.
"""
from __future__ import annotations

import os
from pathlib import Path

# the files padfree reads, at a repo's root or in a sentence-transformers module's folder (huggingface_hub matches
# with fnmatch, where "*" crosses "/": "*/config.json" is every module folder's config)
READ_FILES = ("config.json", "modules.json", "config_sentence_transformers.json", "sentence_bert_config.json",
              "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json", "added_tokens.json",
              "merges.txt", "vocab.json", "*.model")  # *.model: sentencepiece, converted where no tokenizer.json
SAFETENSORS = ("*.safetensors", "*model.safetensors.index.json")
PYTORCH = ("*pytorch_model*.bin", "*pytorch_model.bin.index.json")  # only for a repo without safetensors
IGNORED = ("onnx/*", "openvino/*", "coreml/*")  # other runtimes' exports: never read
ALLOWED = tuple(p for name in READ_FILES for p in (name, f"*/{name}")) + SAFETENSORS


def read_secret(path, what: str = "Hub token") -> str:
    """The secret in the file ``path`` (``--hf-token-file``, ``--api-key-file``), surrounding whitespace stripped;
    ``ValueError`` naming ``what`` where the file cannot be read or holds nothing."""
    try:
        secret = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the {what} file {str(path)!r}: {e.__class__.__name__}: "
                         f"{getattr(e, 'strerror', None) or e}") from None
    if not secret:
        raise ValueError(f"the {what} file {str(path)!r} is empty")
    return secret


def resolve_source(source, revision: str | None = None, token: str | None = None):
    """What the loaders read: a directory or Hub ID (``str`` or ``os.PathLike``) as its local directory
    (:func:`resolve_model`); anything else (an in-memory ``transformers`` model) as it is, for the loader to
    check; ``ValueError`` where a revision is given with it."""
    if isinstance(source, (str, os.PathLike)):
        return resolve_model(source, revision, token)
    if revision is not None:
        raise ValueError(f"revision {revision!r} applies to Hub IDs only, not to an in-memory model")
    return source


def resolve_model(source, revision: str | None = None, token: str | None = None, *,
                  cache_dir: str | os.PathLike | None = None, endpoint: str | None = None) -> Path:
    """The local directory of ``source``: an existing directory as it is; a Hub ID (``org/name`` or ``name``) as
    its snapshot in huggingface_hub's cache, the files padfree reads downloaded where missing (``HF_HUB_OFFLINE``:
    from the cache only).

    ``revision``: a branch, tag or commit of a Hub ID (None: its default branch); a ``ValueError`` with a
    directory. ``token``: for private and gated repos (None: huggingface_hub's own, ``HF_TOKEN`` or the login).
    ``cache_dir`` / ``endpoint``: huggingface_hub's (None: ``HF_HUB_CACHE``, ``HF_ENDPOINT``, as read when
    huggingface_hub was imported). Every failure is a one-line ``ValueError``: neither a directory nor a valid ID,
    an ID not in the cache offline (naming the ID, the revision and the cache searched), a Hub that cannot be
    reached, refuses the token or has no such repo or revision (naming the ID and the cause)."""
    path = Path(source)
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"revision {revision!r} applies to Hub IDs only; {str(source)!r} is a local directory")
        return path
    if path.exists():
        raise ValueError(f"model path {str(source)!r} is not a directory")
    repo_id = check_repo_id(str(source))
    return download(repo_id, revision, token, cache_dir, endpoint)


def check_repo_id(source: str) -> str:
    """``source`` if it is a valid Hub ID (huggingface_hub's rule); ``ValueError`` saying it is neither that nor a
    directory."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(source)
    except HFValidationError:
        raise ValueError(f"model {source!r} is neither a directory nor a Hugging Face Hub ID (org/name)") from None
    return source


def download(repo_id: str, revision: str | None, token: str | None, cache_dir=None, endpoint: str | None = None
             ) -> Path:
    """The snapshot directory of ``repo_id`` at ``revision`` with the files padfree reads (:data:`ALLOWED`); a
    repo whose snapshot holds no safetensors gets its PyTorch weights by a second call at the same commit (the
    snapshot's name). Where huggingface_hub is offline, both read the cache only (``local_files_only``: with a
    commit for revision, snapshot_download would otherwise ask the Hub for the file list). ``ValueError`` as
    :func:`resolve_model`."""
    from huggingface_hub import constants
    offline = constants.is_offline_mode()
    try:
        folder = Path(_snapshot(repo_id, revision, token, cache_dir, endpoint, ALLOWED, offline))
        if not any(folder.rglob("*.safetensors")):
            _snapshot(repo_id, folder.name, token, cache_dir, endpoint, PYTORCH, offline)
    except Exception as e:  # noqa: BLE001 -- every failure of the Hub or the cache becomes one line
        raise hub_error(e, repo_id, revision, cache_dir) from None
    return folder


def _snapshot(repo_id, revision, token, cache_dir, endpoint, allow, local_only: bool) -> str:
    from huggingface_hub import snapshot_download
    return snapshot_download(repo_id, revision=revision, token=token, cache_dir=cache_dir, endpoint=endpoint,
                             allow_patterns=list(allow), ignore_patterns=list(IGNORED), local_files_only=local_only)


def hub_error(e: Exception, repo_id: str, revision: str | None, cache_dir=None) -> ValueError:
    """The one-line ``ValueError`` of a failed :func:`download`: what happened to ``repo_id`` at ``revision``,
    and why."""
    from huggingface_hub import constants, errors
    rev = revision or "main"
    cache = str(cache_dir or constants.HF_HUB_CACHE)
    what = f"model {repo_id!r} (revision {rev!r})"
    if isinstance(e, errors.LocalEntryNotFoundError):  # not (fully) in the cache, and the Hub not asked or reached
        cause = e.__cause__
        if constants.is_offline_mode() or cause is None or isinstance(cause, errors.OfflineModeIsEnabled):
            return ValueError(f"{what} is not in the Hugging Face cache {cache} and HF_HUB_OFFLINE is set: "
                              "download it once with HF_HUB_OFFLINE unset, or pass a directory")
        return ValueError(f"{what} is not in the Hugging Face cache {cache} and the Hub could not be reached: "
                          f"{_cause(cause)}")
    if isinstance(e, errors.GatedRepoError):
        return ValueError(f"{what} is gated: accept its conditions on the Hub and pass a token with access "
                          f"({_cause(e)})")
    if isinstance(e, errors.RevisionNotFoundError):
        return ValueError(f"{what}: the Hub has no such revision ({_cause(e)})")
    if isinstance(e, errors.RepositoryNotFoundError):
        return ValueError(f"{what} is not a local directory and the Hub has no such model, or it is private and "
                          f"needs a token ({_cause(e)})")
    if isinstance(e, errors.HfHubHTTPError) and e.response.status_code in (401, 403):
        return ValueError(f"{what}: the Hub refused the token ({_cause(e)})")
    return ValueError(f"{what} could not be downloaded: {_cause(e)}")


def _cause(e: BaseException) -> str:
    """``Type: message``, the message's first line only (huggingface_hub's span several)."""
    lines = str(e).strip().splitlines()
    return f"{e.__class__.__name__}: {lines[0] if lines else ''}".rstrip(": ")
