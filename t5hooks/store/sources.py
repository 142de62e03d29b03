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

from ..checkpoint_checks import looks_local

TEXT_SUFFIXES = (".txt", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
# Suffixes that mark a name as a local data file, never a hub dataset id.
DATA_SUFFIXES = (*TEXT_SUFFIXES, *JSONL_SUFFIXES, ".csv", ".tsv", ".parquet", ".arrow", ".gz", ".zst", ".bz2", ".xz")


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

    def digest(self) -> dict[str, Any] | None:
        """A hash of the content read so far by the current iteration (None: this source has none; its
        fingerprint covers the content)."""
        return None

    def whole_digest(self) -> dict[str, Any] | None:
        """The hash `digest()` gives after a whole iteration, computed now (None: none)."""
        return None

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


class FileSource(Source):
    """A file read line by line (lines end with `\\n` or `\\r\\n`). The SHA-256 of the bytes read so far is
    updated as they are read (`digest()`), so checking that a file has not changed costs no extra read."""

    kind = "file"

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._hash, self._bytes = hashlib.sha256(), 0

    def _lines(self) -> Iterator[tuple[int, str]]:
        self._hash, self._bytes = hashlib.sha256(), 0
        with open(self.path, "rb") as f:
            for i, raw in enumerate(f):
                self._hash.update(raw)
                self._bytes += len(raw)
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise ValueError(
                        f"{self.path}:{i + 1}: not UTF-8 text ({err.reason} at byte {err.start})"
                    ) from None
                yield i, text.rstrip("\r\n")

    def digest(self) -> dict[str, Any] | None:
        """`{"bytes", "sha256"}` of what the current (or last) iteration has read: the whole file once it ends."""
        return {"bytes": self._bytes, "sha256": self._hash.hexdigest()}

    def whole_digest(self) -> dict[str, Any] | None:
        h, n = hashlib.sha256(), 0
        with open(self.path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
                n += len(block)
        return {"bytes": n, "sha256": h.hexdigest()}

    def fingerprint(self) -> dict[str, Any]:
        # the size here; the content hash is taken while reading and checked window by window (digest())
        return {"kind": self.kind, "path": str(self.path.resolve()), "bytes": self.path.stat().st_size}


class TextFileSource(FileSource):
    """One prompt per line (the line ending removed); `doc` is the 0-based line number."""

    kind = "text"

    def __iter__(self) -> Iterator[Prompt]:
        for i, line in self._lines():
            yield Prompt(i, line)


class JsonlSource(FileSource):
    """One JSON object per line: `field` is the prompt, `decoder_field` (optional) the decoder target."""

    kind = "jsonl"

    def __init__(self, path: str | os.PathLike, field: str = "text", decoder_field: str | None = None) -> None:
        super().__init__(path)
        self.field, self.decoder_field = field, decoder_field

    def __iter__(self) -> Iterator[Prompt]:
        for i, line in self._lines():
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
        return {**super().fingerprint(), "field": self.field, "decoder_field": self.decoder_field}


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
        path = Path(source).expanduser()
        if not path.exists() and looks_local(str(source), DATA_SUFFIXES):
            raise FileNotFoundError(
                f"no such file or folder: {str(source)!r} (a local path; hub datasets are named like 'org/name')"
            )
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
            # the revision (hub: the commit; local data files: their hash) and what the builder was given:
            # a re-published or edited dataset gets another fingerprint, so a resume cannot mix the two
            builder = datasets.load_dataset_builder(name)
        except Exception as err:  # the hub / builders raise many types; report one clear error
            raise ValueError(f"could not load dataset {name!r} (split {split!r}): {err}") from err
        description.update(revision=builder.hash, config_id=builder.config_id)
        if not streaming:
            description["fingerprint"] = ds._fingerprint
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


def check_digest(recorded: dict[str, Any] | None, current: dict[str, Any] | None, where: str) -> None:
    """ValueError unless the content hash recorded when a window was stored equals the source's now."""
    if recorded is not None and current is not None and recorded != current:
        raise ValueError(
            f"the source has changed since {where} was stored (first {recorded['bytes']} bytes: sha256 "
            f"{recorded['sha256'][:12]}... then, {current['sha256'][:12]}... now over {current['bytes']} bytes); "
            f"refusing to mix its old and new data in one store: restore the file, or extract into a new out_dir"
        )
