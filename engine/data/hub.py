"""A Hugging Face dataset as a `prepare` input: a Hub name (streamed) or a local
folder holding one (read the same way, offline), its documents read in order
in the main process and handed to the workers in batches (engine.data.documents
describes inputs and tasks). A batch records the stream's `state_dict()` before
it, so an interrupted prepare resumes where it stopped without reading the
stream from its start again."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from engine.data.documents import document_pieces, optional_module, row_text
from engine.errors import UserInputError


@dataclass(frozen=True)
class Documents:
    """Documents read in order from a streamed dataset."""
    docs: tuple
    units: int

    def pieces(self, chunk_bytes: int):
        for text in self.docs:
            yield from document_pieces(text, chunk_bytes)


class HubDataset:
    """A Hugging Face dataset (a Hub name or a local folder), streamed in order."""
    unit = "documents"

    def __init__(self, name: str, config: str | None, split: str, field: str, chunk_bytes: int):
        self.name, self.config, self.split, self.field, self.chunk_bytes = name, config, split, field, chunk_bytes
        self.local = Path(name).exists()
        self.dataset = open_hub_dataset(name, config, split)
        features = getattr(self.dataset, "features", None)
        if features is not None and field not in features:
            raise UserInputError(f"{name}: has no column {field!r} (its columns: {', '.join(list(features)[:8])}); "
                                 "choose one with --text-field")
        splits = getattr(self.dataset.info, "splits", None) or {}
        self.total_units = getattr(splits.get(split), "num_examples", 0) or 0

    def fingerprint(self) -> dict:
        name = str(Path(self.name).resolve()) if self.local else self.name
        return {"kind": "HubDataset", "name": name, "config": self.config, "split": self.split}

    def tasks(self, first: int = 0, state=None):
        ds = self.dataset
        row = 0
        if state is not None:
            ds.load_state_dict(state["dataset"])
            row = state["row"]
        rows, j = iter(ds), first
        while True:
            before = {"dataset": ds.state_dict(), "row": row}
            docs, size = [], 0
            for example in rows:
                docs.append(row_text(example, self.field, lambda r=row: f"{self.name}: row {r} (counting from 0)"))
                size += len(docs[-1])
                row += 1
                if size >= self.chunk_bytes:
                    break
            if not docs:
                return
            yield j, before, Documents(tuple(docs), len(docs))
            j += 1


def open_hub_dataset(name: str, config: str | None, split: str):
    """`datasets.load_dataset(..., streaming=True)`, its failures as one line each."""
    datasets = optional_module("datasets", "reading a Hugging Face dataset", name)
    # Its retries when offline are logged line by line; the failure is reported below.
    http_log = logging.getLogger("huggingface_hub")
    level = http_log.level
    http_log.setLevel(logging.ERROR)
    try:
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # noqa: BLE001 - the library's errors, each turned into one line
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        if type(e).__name__ == "DatasetNotFoundError":
            raise UserInputError(f"{name}: no such dataset on the Hugging Face Hub, or it is gated (accept its "
                                 "terms on the Hub and log in with `hf auth login`)") from None
        if isinstance(e, OSError) and not Path(name).exists():
            offline = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")
            why = "HF_HUB_OFFLINE is set" if offline else f"no network? {type(e).__name__}"
            raise UserInputError(
                f"{name}: cannot reach the Hugging Face Hub ({why}); offline, download the dataset where there is "
                f"network (`hf download {name} --repo-type dataset --local-dir DIR`, `--include` to take one "
                "config's files) and pass --hf-dataset DIR, or its Parquet files as inputs") from None
        if isinstance(e, (ValueError, KeyError, OSError)):
            raise UserInputError(f"{name}: {reason}") from None
        raise
    finally:
        http_log.setLevel(level)
