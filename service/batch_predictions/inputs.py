"""The rows a batch prediction predicts: parsed from an uploaded CSV (errors that say where), or
taken from a dataset; stored for the worker as an Arrow IPC stream."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from service.datasets.csv_parsing import read_rows
from service.errors import InvalidInput

MAX_ERRORS = 20
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass
class BatchInput:
    """``features [N, D]`` float32 in the model's feature order; ``ids`` and ``target`` are
    carried into the results as they are (either may be absent)."""

    features: np.ndarray
    ids: pa.Array | None = None
    target: pa.Array | None = None

    @property
    def n_rows(self) -> int:
        return int(self.features.shape[0])

    def to_ipc(self) -> bytes:
        n, d = self.features.shape
        columns = {"features": pa.FixedSizeListArray.from_arrays(
            pa.array(np.ascontiguousarray(self.features, dtype=np.float32).reshape(-1)), d)}
        if self.ids is not None:
            columns["id"] = self.ids
        if self.target is not None:
            columns["target"] = self.target
        return table_to_ipc(pa.table(columns))

    @classmethod
    def from_ipc(cls, blob: bytes) -> BatchInput:
        table = ipc_to_table(blob)
        column = table.column("features").combine_chunks()
        width = column.type.list_size
        features = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, width)
        names = table.column_names
        return cls(
            features=features,
            ids=table.column("id").combine_chunks() if "id" in names else None,
            target=table.column("target").combine_chunks() if "target" in names else None,
        )


def table_to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def ipc_to_table(blob: bytes) -> pa.Table:
    """Arrow IPC is data only: reading it never executes code."""
    return pa.ipc.open_stream(pa.py_buffer(blob)).read_all()


def _loc(*parts: object) -> list[object]:
    return ["body", "file", *parts]


def parse_input_csv(
    content: bytes, *, feature_names: list[str], task: str, target_name: str | None, id_column: str | None,
    max_rows: int,
) -> BatchInput:
    """A header row, then one row to predict per line. The columns are the model's features (in
    any order), optionally an id column (``id_column``, else a column named ``id``) and the
    target column (``target_name``, the model's target), carried into the results."""
    header, body = read_rows(content)
    if len(set(header)) != len(header):
        repeated = sorted({name for name in header if header.count(name) > 1})
        raise InvalidInput("the CSV header repeats column names",
                           errors=[{"loc": _loc("header"), "msg": f"repeated: {repeated}", "type": "csv"}])
    if id_column is not None and id_column not in header:
        raise InvalidInput(f"id column {id_column!r} is not in the CSV header",
                           errors=[{"loc": ["body", "id_column"], "msg": f"columns are {header[:50]}", "type": "value_error"}])
    if id_column is None and "id" in header and "id" not in feature_names:
        id_column = "id"
    if id_column is not None and id_column in feature_names:
        raise InvalidInput(f"id column {id_column!r} is one of the model's features",
                           errors=[{"loc": ["body", "id_column"], "msg": "a feature cannot be the id", "type": "value_error"}])
    carried = {name for name in (id_column, target_name) if name is not None}
    missing = [name for name in feature_names if name not in header]
    unknown = [name for name in header if name not in feature_names and name not in carried]
    errors = []
    if missing:
        errors.append({"loc": _loc("header"), "msg": f"missing the model's features {missing[:20]}"
                       + (f" and {len(missing) - 20} more" if len(missing) > 20 else ""), "type": "missing"})
    for name in unknown[:MAX_ERRORS]:
        errors.append({"loc": _loc("column", name), "msg": "not a feature of the model (nor the id or target column)",
                       "type": "extra_forbidden"})
    if errors:
        raise InvalidInput("the CSV's columns do not match the model's features", errors=errors)
    if not body:
        raise InvalidInput("the CSV has no data rows", errors=[{"loc": _loc(), "msg": "only a header", "type": "csv"}])
    if len(body) > max_rows:
        raise InvalidInput(f"the CSV is too large: at most {max_rows} rows",
                           errors=[{"loc": _loc(), "msg": f"{len(body)} rows", "type": "too_large"}])

    columns = [header.index(name) for name in feature_names]
    id_index = header.index(id_column) if id_column is not None else None
    target_index = header.index(target_name) if target_name is not None and target_name in header else None
    features = np.empty((len(body), len(feature_names)), dtype=np.float32)
    ids: list[str] = []
    targets: list[str | float | None] = []
    for r, row in enumerate(body):
        line = r + 2  # 1-based, after the header
        if len(row) != len(header):
            errors.append({"loc": _loc("line", line), "msg": f"{len(row)} fields, header has {len(header)}", "type": "csv"})
        else:
            for c, i in enumerate(columns):
                try:
                    value = float(row[i])
                except ValueError:
                    value = math.nan
                if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
                    errors.append({"loc": _loc("line", line, "column", header[i]),
                                   "msg": f"{row[i].strip()[:50]!r} is not a finite float32 number", "type": "float_parsing"})
                features[r, c] = value if math.isfinite(value) else 0.0
            if id_index is not None:
                ids.append(row[id_index].strip())
            if target_index is not None:
                cell = row[target_index].strip()
                if task == "regression" and cell:
                    try:
                        number = float(cell)
                    except ValueError:
                        number = math.nan
                    if not math.isfinite(number):
                        errors.append({"loc": _loc("line", line, "column", header[target_index]),
                                       "msg": f"{cell[:50]!r} is not a finite number (regression target; leave it empty if unknown)",
                                       "type": "float_parsing"})
                    targets.append(number)
                else:
                    targets.append(cell if cell else None)
        if len(errors) >= MAX_ERRORS:
            break
    if errors:
        raise InvalidInput(f"the CSV has {len(errors)}{'+' if len(errors) >= MAX_ERRORS else ''} bad values",
                           errors=errors)
    return BatchInput(
        features=features,
        ids=pa.array(ids, pa.string()) if id_index is not None else None,
        target=(pa.array(targets, pa.float64() if task == "regression" else pa.string())
                if target_index is not None else None),
    )
