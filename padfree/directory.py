"""A checkpoint directory's layout, read in one place: a plain Hugging Face directory, or a sentence-transformers
one (``modules.json`` listing its modules, each in its folder with its ``config.json``)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


def read_json(file: Path) -> dict:
    """A JSON file's object, or ``{}`` where the file does not exist."""
    return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}


@dataclass(frozen=True)
class Module:
    """One entry of ``modules.json``."""
    kind: str    # the class name: Transformer, Pooling, Normalize, MLMTransformer, SpladePooling, CrossEncoder, ...
    type: str    # the full name modules.json gives
    path: Path   # its folder (the directory itself for a module without one)
    has_path: bool

    def config(self) -> dict:
        return read_json(self.path / "config.json")


@dataclass(frozen=True)
class Layout:
    root: Path
    modules: tuple[Module, ...]  # () for a plain Hugging Face directory
    modular: bool                # a sentence-transformers directory (it has modules.json)

    def find(self, *kinds: str) -> Module | None:
        """The last module of one of these kinds (sentence-transformers' own lookups take the last), or None."""
        found = [m for m in self.modules if m.kind in kinds]
        return found[-1] if found else None

    def check_kinds(self, supported: tuple[str, ...], what: str = "") -> None:
        """``ValueError`` naming the first module not in ``supported`` (``what``: for which class)."""
        for m in self.modules:
            if m.kind not in supported:
                raise ValueError(f"unsupported sentence-transformers module {m.type!r}{what}; padfree supports "
                                 f"{', '.join(supported)}")

    def model_dir(self, *kinds: str) -> Path:
        """The folder of the checkpoint: that of the last module of ``kinds`` with a folder, else the root."""
        dirs = [m.path for m in self.modules if m.kind in kinds and m.has_path]
        return dirs[-1] if dirs else self.root

    def architectures(self) -> list[str]:
        """``architectures`` of the first ``config.json`` found in the root or a module's folder."""
        for d in [self.root] + [m.path for m in self.modules if m.has_path]:
            conf = d / "config.json"
            if conf.is_file():
                return list(read_json(conf).get("architectures") or [])
        raise ValueError(f"{self.root} has no config.json: not a Hugging Face or sentence-transformers checkpoint")


def read_layout(path) -> Layout:
    """The directory's :class:`Layout`; ``ValueError`` where ``path`` is not a directory."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"model path {str(root)!r} is not a directory")
    file = root / "modules.json"
    modular = file.is_file()
    entries = json.loads(file.read_text(encoding="utf-8")) if modular else []
    return Layout(root, tuple(Module(m["type"].rsplit(".", 1)[-1], m["type"], root / m.get("path", ""),
                                     bool(m.get("path"))) for m in entries), modular)
