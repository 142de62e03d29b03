"""Prompt sources for extraction: a text file, a JSONL file, a Hugging Face `datasets` dataset, or a list.

Every source yields `Prompt(doc, text, decoder_text)` where `doc` is the prompt's index in the source
(its line number for files, its row for datasets), so stored rows map back to their prompt. A source
also describes itself (`fingerprint()`): an existing store refuses to continue from a different one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEXT_SUFFIXES = (".txt", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


@dataclass(frozen=True)
class Prompt:
    doc: int  # index in the source (line number for files, row for datasets)
    text: str
    decoder_text: str | None = None


class Source:
    """An iterable of `Prompt`s in a fixed order, with a description for the store's manifest."""

    def __iter__(self) -> Iterator[Prompt]:
        raise NotImplementedError

    def fingerprint(self) -> dict[str, Any]:
        raise NotImplementedError

    def __len__(self) -> int:  # may raise TypeError (streaming sources have no length)
        raise TypeError(f"{type(self).__name__} has no length")

    @property
    def has_decoder(self) -> bool:
        return False


class ListSource(Source):
    """Prompts given in memory: a list of strings (or of (text, decoder_text) pairs)."""

    def __init__(self, items: Sequence[Any]) -> None:
        self.items = list(items)

    def __iter__(self) -> Iterator[Prompt]:
        for i, item in enumerate(self.items):
            if isinstance(item, (tuple, list)):
                yield Prompt(i, _as_text(item[0], f"item {i}"), _as_text(item[1], f"item {i} (decoder)"))
            else:
                yield Prompt(i, _as_text(item, f"item {i}"))

    def __len__(self) -> int:
        return len(self.items)

    @property
    def has_decoder(self) -> bool:
        return bool(self.items) and isinstance(self.items[0], (tuple, list))

    def fingerprint(self) -> dict[str, Any]:
        digest = hashlib.sha256(json.dumps(self.items, ensure_ascii=False).encode()).hexdigest()
        return {"kind": "list", "n": len(self.items), "sha256": digest}


class TextFileSource(Source):
    """One prompt per line (the trailing newline removed); `doc` is the 0-based line number."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __iter__(self) -> Iterator[Prompt]:
        with open(self.path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                yield Prompt(i, line.rstrip("\r\n"))

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": "text", "path": str(self.path.resolve()), **_file_digest(self.path)}


class JsonlSource(Source):
    """One JSON object per line: `field` is the prompt, `decoder_field` (optional) the decoder target."""

    def __init__(self, path: str | os.PathLike, field: str = "text", decoder_field: str | None = None) -> None:
        self.path, self.field, self.decoder_field = Path(path), field, decoder_field

    def __iter__(self) -> Iterator[Prompt]:
        with open(self.path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    yield Prompt(i, "")  # an empty line is an empty prompt (extract reports or skips it)
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{self.path}:{i + 1}: not valid JSON ({err.msg})") from err
                where = f"{self.path}:{i + 1}"
                yield Prompt(i, _field(record, self.field, where), _decoder(record, self.decoder_field, where))

    @property
    def has_decoder(self) -> bool:
        return self.decoder_field is not None

    def fingerprint(self) -> dict[str, Any]:
        return {
            "kind": "jsonl",
            "path": str(self.path.resolve()),
            "field": self.field,
            "decoder_field": self.decoder_field,
            **_file_digest(self.path),
        }


class DatasetSource(Source):
    """A Hugging Face `datasets` Dataset / IterableDataset (object, hub name or local path; streaming)."""

    def __init__(
        self,
        dataset: Any,
        field: str = "text",
        decoder_field: str | None = None,
        *,
        description: dict[str, Any] | None = None,
    ) -> None:
        self.dataset, self.field, self.decoder_field = dataset, field, decoder_field
        self.description = description or {}
        columns = getattr(dataset, "column_names", None)
        if isinstance(columns, list):
            for name in [field, decoder_field]:
                if name is not None and name not in columns:
                    raise ValueError(f"dataset has no column {name!r}; its columns: {columns}")

    def __iter__(self) -> Iterator[Prompt]:
        for i, record in enumerate(self.dataset):
            where = f"dataset row {i}"
            yield Prompt(i, _field(record, self.field, where), _decoder(record, self.decoder_field, where))

    def __len__(self) -> int:
        return len(self.dataset)  # IterableDataset raises TypeError

    @property
    def has_decoder(self) -> bool:
        return self.decoder_field is not None

    def fingerprint(self) -> dict[str, Any]:
        ident = self.description or {"fingerprint": getattr(self.dataset, "_fingerprint", None)}
        if ident.get("fingerprint") is None and not self.description:
            info = getattr(self.dataset, "info", None)
            ident = {"dataset": getattr(info, "dataset_name", None), "config": getattr(info, "config_name", None)}
        return {"kind": "datasets", "field": self.field, "decoder_field": self.decoder_field, **ident}


def open_source(
    source: Any,
    field: str = "text",
    decoder_field: str | None = None,
    *,
    split: str = "train",
    streaming: bool = False,
) -> Source:
    """A `Source` from a path (.txt: one prompt a line; .jsonl: `field`), a `datasets` dataset object,
    a dataset name or saved-dataset directory (loaded with `datasets`; `split`, `streaming`), or a list."""
    if isinstance(source, Source):
        return source
    if isinstance(source, (list, tuple)):
        return ListSource(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_file():
            if path.suffix.lower() in JSONL_SUFFIXES:
                return JsonlSource(path, field, decoder_field)
            if decoder_field is not None:
                raise ValueError(f"{path} is a text file (one prompt a line): a decoder field needs JSONL")
            return TextFileSource(path)
        return _load_dataset(str(source), field, decoder_field, split, streaming)
    if hasattr(source, "__iter__") and (hasattr(source, "column_names") or hasattr(source, "features")):
        return DatasetSource(source, field, decoder_field)
    raise TypeError(
        f"source must be a text/JSONL file path, a datasets dataset (object, name or saved directory) or a list "
        f"of strings; got {type(source).__name__}"
    )


def _load_dataset(name: str, field: str, decoder_field: str | None, split: str, streaming: bool) -> DatasetSource:
    try:
        import datasets
    except ImportError as err:
        raise ValueError(
            f"{name!r} is not a file; loading it as a Hugging Face dataset needs `datasets` "
            f"(pip install 't5hooks[store]')"
        ) from err
    path = Path(name)
    description: dict[str, Any] = {"dataset": name, "split": split, "streaming": streaming}
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        ds = datasets.load_from_disk(str(path))  # a save_to_disk directory
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"{name} has splits {list(ds)}; no split {split!r}")
            ds = ds[split]
        description = {"dataset": str(path.resolve()), "split": split, "fingerprint": ds._fingerprint}
        if streaming:
            ds = ds.to_iterable_dataset()
    else:
        if path.exists() and not path.is_dir():
            raise ValueError(f"{name}: unknown file type {path.suffix!r}; use .txt (one prompt a line) or .jsonl")
        try:
            ds = datasets.load_dataset(name, split=split, streaming=streaming)
        except Exception as err:  # the hub / builders raise many types; report one clear error
            raise ValueError(f"could not load dataset {name!r} (split {split!r}): {err}") from err
    return DatasetSource(ds, field, decoder_field, description=description)


def _as_text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: expected a string prompt, got {type(value).__name__}")
    return value


def _field(record: Any, field: str, where: str) -> str:
    if not isinstance(record, dict) or field not in record:
        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{where}: no field {field!r} (fields: {keys}); choose it with field=/--field")
    return _as_text(record[field], f"{where} field {field!r}")


def _decoder(record: Any, field: str | None, where: str) -> str | None:
    return None if field is None else _field(record, field, where)


def _file_digest(path: Path, chunk: int = 1 << 20) -> dict[str, Any]:
    """Size plus a hash of the first and last MiB: cheap for huge corpora, catches edits and swaps."""
    size = path.stat().st_size
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(chunk))
        if size > chunk:
            f.seek(max(chunk, size - chunk))
            h.update(f.read(chunk))
    return {"bytes": size, "sha256_ends": h.hexdigest()}
