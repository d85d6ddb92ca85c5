"""BiCache's depth table on disk: `bicache.json`, written once per model by `dlmtrt bicache-profile` and read by
the server (and the evaluator), in the model's directory or wherever `--bicache-table` points.

The file holds the table and what it was profiled from (threshold, buckets, per-bucket mean similarities, the
sample source and counts), so that a reader can tell whether it fits the model it is given: a table profiled on
a model of another depth is refused rather than silently mis-applied."""
from __future__ import annotations

import json
from pathlib import Path

from dlmtrt.errors import UsageError

from .bicache import DepthTable

TABLE_FILE = "bicache.json"
FORMAT = "dlmtrt-bicache-profile"
VERSION = 1


def table_path(model_dir: str | Path, explicit: str | Path | None = None) -> Path | None:
    """The table to use: `explicit` (it must exist), else the model directory's bicache.json if there is one."""
    if explicit is not None:
        p = Path(explicit).expanduser()
        if not p.is_file():
            raise UsageError(f"--bicache-table: {p} is not a file; give the JSON that dlmtrt bicache-profile wrote")
        return p
    p = Path(model_dir) / TABLE_FILE
    return p if p.is_file() else None


def read_table(path: str | Path, layers: int) -> tuple[DepthTable, dict]:
    """(table, the whole document) of a profile file, checked against a model of `layers` layers."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UsageError(f"BiCache table {p} cannot be read ({e}); profile the model again with "
                         "dlmtrt bicache-profile") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("table"), dict):
        raise UsageError(f"{p} is not a BiCache profile (no '{FORMAT}' format with a table); write one with "
                         "dlmtrt bicache-profile")
    if doc.get("layers") != layers:
        raise UsageError(f"BiCache table {p} was profiled on a {doc.get('layers')}-layer model, this one has "
                         f"{layers}: profile this model (dlmtrt bicache-profile)")
    if not doc["table"]:
        raise UsageError(f"BiCache table {p} is empty: no layer's prefix K/V stayed above its threshold "
                         f"{doc.get('threshold')}, so BiCache would reuse nothing; profile with a lower --threshold")
    try:
        table = DepthTable.of(doc["table"])
    except (TypeError, ValueError):
        raise UsageError(f"BiCache table {p}: 'table' must map ratios to layer counts, got {doc['table']!r}") from None
    if table.depths[-1][1] > layers:
        raise UsageError(f"BiCache table {p} asks for {table.depths[-1][1]} layers of a {layers}-layer model")
    return table, doc


def write_table(path: str | Path, doc: dict) -> Path:
    """Write a profile document (atomically: a server starting meanwhile never reads half a file)."""
    from dlmtrt.paths import write_text_atomic
    return write_text_atomic(path, json.dumps({"format": FORMAT, "version": VERSION, **doc}, indent=1) + "\n")
