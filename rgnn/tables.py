"""The per-class AP table in the shape of the paper's Table 3: a row per model, a column per class, then mAP."""
from __future__ import annotations

import csv
import io

import numpy as np


def ap_table(rows: dict[str, np.ndarray], class_names: list[str]) -> list[list[str]]:
    """rows: model name -> AP float[C] (NaN for classes without positives) -> header + rows of strings (AP in %)."""
    table = [["model", *class_names, "mAP"]]
    for name, ap in rows.items():
        ap = np.asarray(ap, np.float64)
        cells = ["-" if np.isnan(a) else f"{100 * a:.1f}" for a in ap]
        table.append([name, *cells, f"{100 * np.nanmean(ap):.1f}"])
    return table


def to_markdown(table: list[list[str]]) -> str:
    head, *body = table
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines) + "\n"


def to_csv(table: list[list[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(table)
    return buf.getvalue()
