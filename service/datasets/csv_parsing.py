"""Parse an uploaded CSV into a :class:`service.ml.data.Dataset`, with errors that say where."""

from __future__ import annotations

import csv
import io
import math

import numpy as np

from service.errors import InvalidInput
from service.ml.data import Dataset

MAX_ERRORS = 20


def _loc(*parts: object) -> list[object]:
    return ["body", "file", *parts]


def read_rows(content: bytes) -> tuple[list[str], list[list[str]]]:
    """The header (names stripped) and the non-blank rows of an uploaded CSV file (UTF-8,
    optional BOM); InvalidInput at body.file when it cannot be decoded or parsed, or is empty."""
    try:
        text = content.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise InvalidInput(
            "the CSV file is not valid UTF-8",
            errors=[{"loc": _loc(), "msg": f"byte {exc.start} is not UTF-8", "type": "encoding"}],
        ) from None
    try:
        rows = [row for row in csv.reader(io.StringIO(text)) if any(cell.strip() for cell in row)]
    except csv.Error as exc:
        raise InvalidInput(
            "the file could not be read as CSV",
            errors=[{"loc": _loc(), "msg": str(exc), "type": "csv"}],
        ) from None
    if not rows:
        raise InvalidInput("the CSV file is empty", errors=[{"loc": _loc(), "msg": "no header row", "type": "csv"}])
    return [cell.strip() for cell in rows[0]], rows[1:]


def parse_csv(
    content: bytes, *, target: str, task: str, max_rows: int, max_features: int
) -> Dataset:
    """A header row, then one example per row; every column but ``target`` must be numeric."""
    header, body = read_rows(content)
    if target not in header:
        raise InvalidInput(
            f"target column {target!r} is not in the CSV header",
            errors=[{"loc": ["body", "target"], "msg": f"columns are {header}", "type": "value_error"}],
        )
    if len(set(header)) != len(header):
        duplicates = sorted({name for name in header if header.count(name) > 1})
        raise InvalidInput(
            "the CSV header repeats column names",
            errors=[{"loc": _loc("header"), "msg": f"repeated: {duplicates}", "type": "csv"}],
        )
    if len(header) < 2:
        raise InvalidInput(
            "the CSV needs at least one feature column besides the target",
            errors=[{"loc": _loc("header"), "msg": "only the target column", "type": "csv"}],
        )
    if len(body) < 2:
        raise InvalidInput(
            "the CSV needs at least two data rows",
            errors=[{"loc": _loc(), "msg": f"{len(body)} data rows", "type": "csv"}],
        )
    if len(body) > max_rows or len(header) - 1 > max_features:
        raise InvalidInput(
            f"the CSV is too large: at most {max_rows} rows and {max_features} feature columns",
            errors=[{"loc": _loc(), "msg": f"{len(body)} rows, {len(header) - 1} features", "type": "too_large"}],
        )

    target_index = header.index(target)
    feature_names = [name for i, name in enumerate(header) if i != target_index]
    features = np.empty((len(body), len(feature_names)), dtype=np.float32)
    labels: list[str] = []
    errors: list[dict[str, object]] = []
    for r, row in enumerate(body):
        line = r + 2  # 1-based, after the header
        if len(row) != len(header):
            errors.append({"loc": _loc("line", line), "msg": f"{len(row)} fields, header has {len(header)}", "type": "csv"})
            if len(errors) >= MAX_ERRORS:
                break
            continue
        c = 0
        for i, cell in enumerate(row):
            if i == target_index:
                labels.append(cell.strip())
                continue
            try:
                value = float(cell)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                errors.append({
                    "loc": _loc("line", line, "column", header[i]),
                    "msg": f"{cell.strip()!r} is not a finite number",
                    "type": "float_parsing",
                })
            features[r, c] = value
            c += 1
        if len(errors) >= MAX_ERRORS:
            break
    if errors:
        raise InvalidInput(f"the CSV has {len(errors)}{'+' if len(errors) >= MAX_ERRORS else ''} bad values", errors=errors)

    if task == "classification":
        class_names = sorted(set(labels), key=_natural_key)
        if len(class_names) < 2:
            raise InvalidInput(
                "classification needs at least two classes in the target column",
                errors=[{"loc": _loc("column", target), "msg": f"classes found: {class_names}", "type": "value_error"}],
            )
        if len(class_names) > 1000:
            raise InvalidInput(
                "too many classes (more than 1000): is this a regression target?",
                errors=[{"loc": _loc("column", target), "msg": f"{len(class_names)} classes", "type": "value_error"}],
            )
        index = {name: i for i, name in enumerate(class_names)}
        target_values = np.array([index[label] for label in labels], dtype=np.int64)
    else:
        class_names = None
        target_values = np.empty(len(labels), dtype=np.float32)
        for r, label in enumerate(labels):
            try:
                value = float(label)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                errors.append({
                    "loc": _loc("line", r + 2, "column", target),
                    "msg": f"{label!r} is not a finite number (regression target)",
                    "type": "float_parsing",
                })
                if len(errors) >= MAX_ERRORS:
                    break
            else:
                target_values[r] = value
        if errors:
            raise InvalidInput("the regression target has values that are not numbers", errors=errors)

    return Dataset(
        features=features,
        target=target_values,
        task=task,  # type: ignore[arg-type]
        feature_names=feature_names,
        class_names=class_names,
        target_name=target,
    )


def _natural_key(label: str) -> tuple[int, float, str]:
    """Numeric labels sort by value ("2" before "10"), other labels alphabetically after them."""
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)
