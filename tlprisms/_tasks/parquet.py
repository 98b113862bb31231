"""Per-prompt sparse terms of a task, written in row groups to a Parquet file (pyarrow).

One row per (prompt, kept term): the ``k`` largest non-constant terms of each prompt by
|value| (``rank`` 0 = largest), plus one ``"(rest)"`` row (``rank`` = k, kind ``"rest"``)
that holds every other term, constants included, so that the values of a prompt's rows add
up to its ``logit`` (to float rounding). Columns:

``index`` (the prompt's position in the task), ``prompt``, ``answer``, ``position`` (the
explained token), ``logit``, ``rank``, ``component``, ``kind``, ``layer``, ``head``,
``neuron`` (-1 where a field does not apply), ``value``.

Rows are buffered and written as row groups of about :data:`ROW_GROUP_ROWS` rows; the
caller closes the writer in a ``finally`` block, so an interrupted task leaves a readable
file holding every completed batch. The file's key-value metadata (``tlprisms``) records
what the terms explain, the precision, ``k``, the rank and world size, how many prompts
were written and whether the task completed.
"""

import json
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from tlprisms._core.errors import ArgumentError
from tlprisms._core.table import ComponentTable

__all__ = [
    "SparseWriter",
    "ROW_GROUP_ROWS",
    "RUN_KEY",
    "REST",
    "SUFFIXES",
    "check_path",
    "rank_path",
    "require_pyarrow",
]

#: the file name endings a Parquet path may have
SUFFIXES = (".parquet", ".pq", ".parq")

#: rows buffered before a row group is written
ROW_GROUP_ROWS = 65536
#: the footer metadata key written when the writer closes
RUN_KEY = "tlprisms_run"
#: the label of the row that holds the terms not kept
REST = "(rest)"


def require_pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as err:  # pragma: no cover - pyarrow is in the test extra
        raise ImportError(
            "explain_task(parquet=...) needs pyarrow; install it with "
            "pip install 'tlprisms[parquet]' (or pip install pyarrow)."
        ) from err
    return pyarrow


def rank_path(path: Any, rank: int, world: int) -> Path:
    """The file of ``rank``: ``path`` with ``{rank}`` filled in, or, when more than one
    process writes and ``path`` has no ``{rank}``, ``stem-rank{r}.suffix``."""
    text = str(path)
    if "{rank}" in text:
        return Path(text.replace("{rank}", str(rank)))
    p = Path(text)
    if world <= 1:
        return p
    return p.with_name(f"{p.stem}-rank{rank}{p.suffix}")


def check_path(path: Any, rank: int, world: int, caller: str) -> Path:
    """The file ``rank`` writes, checked before any work: a str or path ending in a Parquet
    suffix, not a directory, under a directory that exists (or can be made) and is writable.
    Needs pyarrow. Refusals are :class:`ArgumentError` naming the path and the fix."""
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
        raise ArgumentError(f"{caller}: parquet={path!r:.60}; pass a file path or None.")
    text = str(os.fspath(path))
    if not text.strip():
        raise ArgumentError(f"{caller}: parquet={text!r} is empty; pass a file path or None.")
    p = rank_path(path, rank, world)
    if p.is_dir():
        raise ArgumentError(
            f"{caller}: parquet={text!r} is a directory; pass a file path inside it, "
            f"e.g. {str(p / 'terms.parquet')!r}."
        )
    if p.suffix.lower() not in SUFFIXES:
        raise ArgumentError(
            f"{caller}: parquet={text!r} does not end in {', '.join(SUFFIXES)}; pass a file "
            f"name like 'terms.parquet' (the file is written in the Parquet format)."
        )
    parent = p.parent if str(p.parent) else Path(".")
    up = parent
    while not up.exists() and up != up.parent:
        up = up.parent
    if not up.is_dir():
        raise ArgumentError(
            f"{caller}: parquet={text!r} cannot be written: {str(up)!r} is a file, not a "
            "directory; pass a path under a directory."
        )
    if not os.access(up, os.W_OK | os.X_OK):
        raise ArgumentError(
            f"{caller}: parquet={text!r} cannot be written: the directory {str(up)!r} is not "
            "writable; pass a path under a directory you can write to."
        )
    require_pyarrow()
    return p


def _schema(pa: Any, meta: dict) -> Any:
    return pa.schema(
        [
            ("index", pa.int64()),
            ("prompt", pa.string()),
            ("answer", pa.string()),
            ("position", pa.int32()),
            ("logit", pa.float64()),
            ("rank", pa.int32()),
            ("component", pa.string()),
            ("kind", pa.string()),
            ("layer", pa.int32()),
            ("head", pa.int32()),
            ("neuron", pa.int32()),
            ("value", pa.float64()),
        ],
        metadata={"tlprisms": json.dumps(meta)},
    )


class SparseWriter:
    """Writes the ``k`` largest terms of each prompt (plus the rest) to ``path``."""

    def __init__(self, path: Path, k: int, meta: dict) -> None:
        self.pa = require_pyarrow()
        self.path = Path(path)
        self.k = k
        self.meta = dict(meta, k=k)
        self.schema = _schema(self.pa, self.meta)
        self.writer: Optional[Any] = None
        self.buffer: list = []
        self.rows = 0
        self.prompts = 0
        self.labels: Optional[tuple] = None

    def _labels(self, table: ComponentTable) -> tuple:
        if self.labels is None:
            self.labels = (
                np.asarray([str(c) for c in table], dtype=object),
                np.asarray(table.kinds(), dtype=object),
                np.asarray(table.layer, dtype=np.int32),
                np.asarray(table.head, dtype=np.int32),
                np.asarray(table.neuron, dtype=np.int32),
            )
        return self.labels

    def add(
        self,
        index: list,
        prompts: list,
        answers: list,
        positions: list,
        values: Float[Tensor, "prompt comp"],
        logits: Float[Tensor, "prompt"],
        table: ComponentTable,
    ) -> None:
        """Buffer one batch (top k chosen on the values' device; only [prompt, k] moves)."""
        B, C = values.shape
        constant = torch.as_tensor(table.is_constant(), device=values.device)
        k = min(self.k, int((~constant).sum()))
        absv = torch.where(constant[None], -torch.inf, values.abs())
        top: Int[Tensor, "prompt k"] = torch.topk(absv, k, dim=1).indices
        kept = values.gather(1, top)
        rest = values.double().sum(1) - kept.double().sum(1)
        label, kind, layer, head, neuron = self._labels(table)
        top_np = top.cpu().numpy()
        vals = torch.cat([kept.double(), rest[:, None]], 1).cpu().numpy()
        flat = top_np.reshape(-1)
        n = k + 1

        def per_term(col: np.ndarray, rest_value: Any) -> np.ndarray:
            out = np.empty((B, n), dtype=col.dtype)
            out[:, :k] = col[flat].reshape(B, k)
            out[:, k] = rest_value
            return out.reshape(-1)

        rep = lambda seq, dtype: np.repeat(np.asarray(seq, dtype=dtype), n)
        self.buffer.append(
            self.pa.table(
                {
                    "index": rep(index, np.int64),
                    "prompt": rep(prompts, object),
                    "answer": rep([str(a) for a in answers], object),
                    "position": rep(positions, np.int32),
                    "logit": rep(logits.detach().double().cpu().numpy(), np.float64),
                    "rank": np.tile(np.arange(n, dtype=np.int32), B),
                    "component": per_term(label, REST),
                    "kind": per_term(kind, "rest"),
                    "layer": per_term(layer, -1),
                    "head": per_term(head, -1),
                    "neuron": per_term(neuron, -1),
                    "value": vals.reshape(-1),
                },
                schema=self.schema,
            )
        )
        self.rows += B * n
        self.prompts += B
        if sum(t.num_rows for t in self.buffer) >= ROW_GROUP_ROWS:
            self.flush()

    def _open(self) -> Any:
        if self.writer is None:
            import pyarrow.parquet as pq

            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.writer = pq.ParquetWriter(str(self.path), self.schema)
        return self.writer

    def flush(self) -> None:
        """Write the buffered batches as one row group."""
        if self.buffer:
            table = self.pa.concat_tables(self.buffer)
            self.buffer = []
            self._open().write_table(table, row_group_size=max(table.num_rows, 1))

    def close(self, complete: bool, **extra: Any) -> None:
        """Write what is buffered and the file footer (an empty file if nothing came); the
        footer's ``tlprisms_run`` metadata says how many prompts were written and whether
        the task completed."""
        try:
            self.flush()
        finally:
            writer = self._open()
            meta = dict(self.meta, **extra, prompts=self.prompts, complete=complete)
            if hasattr(writer, "add_key_value_metadata"):
                writer.add_key_value_metadata({RUN_KEY: json.dumps(meta)})
            writer.close()
