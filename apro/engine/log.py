"""The per-step loss log of a run: ``log.csv`` and ``log.jsonl``."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

from .._atomic import atomic_path

LOG_CSV = "log.csv"
LOG_JSONL = "log.jsonl"


class LossLog:
    """Per-step loss terms written to ``log.csv`` and ``log.jsonl`` (rank 0 only).

    Rows are ``{"step", "epoch", "lr", <every loss term>}`` (and ``"grad_norm"`` when the run
    clips gradients). On resume the files are rewritten
    from the checkpoint's history, so rows logged after that checkpoint by an interrupted run
    disappear and the curve continues as if uninterrupted.
    """

    def __init__(self, out_dir, history: Sequence[dict] = ()):
        self.out_dir = Path(out_dir)
        self.rows = [dict(r) for r in history]
        self.columns: list = []
        for r in self.rows:
            self._extend_columns(r)
        self._rewrite()

    def _extend_columns(self, row: dict) -> bool:
        new = [k for k in row if k not in self.columns]
        self.columns.extend(new)
        return bool(new)

    def _rewrite(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for name, write in ((LOG_CSV, self._write_csv), (LOG_JSONL, self._write_jsonl)):
            with atomic_path(self.out_dir / name) as tmp, open(tmp, "w", newline="") as f:
                write(f, self.rows)

    def _write_csv(self, f, rows, header=True) -> None:
        writer = csv.DictWriter(f, fieldnames=self.columns, restval="")
        if header:
            writer.writeheader()
        writer.writerows(rows)

    @staticmethod
    def _write_jsonl(f, rows) -> None:
        for r in rows:
            f.write(json.dumps(r) + "\n")

    def append(self, row: dict) -> None:
        self.rows.append(dict(row))
        if self._extend_columns(row):
            self._rewrite()  # a new loss term appeared: the CSV header must change
            return
        with open(self.out_dir / LOG_CSV, "a", newline="") as f:
            self._write_csv(f, [row], header=False)
        with open(self.out_dir / LOG_JSONL, "a") as f:
            self._write_jsonl(f, [row])


def read_log(path) -> list:
    """Rows of a ``log.jsonl`` written by :class:`LossLog`."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
