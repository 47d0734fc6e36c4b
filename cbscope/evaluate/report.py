"""The evaluation report: summary numbers, per-example rows, run metadata, three files."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cbscope.errors import ConfigError
from cbscope.evaluate import render
from cbscope.evaluate.summary import summarise
from cbscope.io import atomic_write_text

if TYPE_CHECKING:
    import plotly.graph_objects as go

__all__ = ["REPORT_FILES", "REPORT_FORMAT_VERSION", "Report", "check_report_dir"]

REPORT_FORMAT_VERSION = 1
#: The files :meth:`Report.save` writes, by format.
REPORT_FILES = {"json": "report.json", "md": "report.md", "html": "report.html"}


def check_report_dir(out_dir: str | os.PathLike[str]) -> Path:
    """Check that the report's three files can be written into ``out_dir``; creates nothing.

    The folder may exist (its report files are replaced, nothing else is touched) or not (its
    nearest existing parent must be a writable folder). Writability is probed with a temporary
    file that is removed at once.

    Raises:
        ConfigError: ``out_dir`` (or a parent) is a file, a report file is a folder, or the
            folder cannot be written.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(
            f"--out {out} is a file, not a folder: give a folder for "
            + ", ".join(REPORT_FILES.values())
        )
    for name in REPORT_FILES.values():
        if (out / name).is_dir():
            raise ConfigError(
                f"--out {out}: {out / name} is a folder; remove it or pick another --out"
            )
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out {out}: {parent} is a file, so no folder can be made under it")
    try:
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".cbscope-probe-"):
            pass
    except OSError as err:
        raise ConfigError(f"--out {out}: cannot write in {parent} ({err.strerror or err})") from err
    return out


@dataclass
class Report:
    """The evaluation report: summary numbers, per-example rows and run metadata.

    Attributes:
        attacks: ``{attack: {"base", "cb", "n", "by_split", "by_category", "outcomes"}}``
            (attack success rates in ``[0, 1]``; ``cb`` is ``None`` without an adapter).
        capability: ``{metric: {"base", "cb", "n"}}`` plus ``"retain"``: KL and perplexities.
        over_refusal: ``{set: {"base", "cb", "n", "refused", "fired"}}``.
        finetune_attack: ``{"lr", "steps", "asr", "base_asr", "curves", "by_lr"}``.
        firing: Output-based (``outputs``: share of degenerate responses per attack) and
            cosine-trace (``trace``) firing statistics.
        rows: One dict per judged example (``section`` says which part it belongs to).
        meta: Model, adapter, config, timings, data sources.
    """

    attacks: dict[str, Any]
    capability: dict[str, Any]
    over_refusal: dict[str, Any]
    finetune_attack: dict[str, Any]
    firing: dict[str, Any]
    rows: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_rows(cls, rows: list[dict[str, Any]], meta: dict[str, Any] | None = None) -> Report:
        """Build a report from rows (every number via :func:`summarise`)."""
        meta = meta or {}
        return cls(**summarise(rows, meta.get("finetune_primary_lr")), rows=rows, meta=meta)

    def to_dict(self) -> dict[str, Any]:
        """The ``report.json`` content."""
        return {
            "format_version": REPORT_FORMAT_VERSION,
            "attacks": self.attacks,
            "capability": self.capability,
            "over_refusal": self.over_refusal,
            "finetune_attack": self.finetune_attack,
            "firing": self.firing,
            "meta": self.meta,
            "rows": self.rows,
        }

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Report:
        """Read a ``report.json`` (or the folder holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "report.json"
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(
            attacks=data["attacks"],
            capability=data["capability"],
            over_refusal=data["over_refusal"],
            finetune_attack=data["finetune_attack"],
            firing=data["firing"],
            rows=data["rows"],
            meta=data.get("meta", {}),
        )

    def save(self, out_dir: str | os.PathLike[str], *, plotlyjs: str = "beside") -> dict[str, Path]:
        """Write ``report.json``, ``report.md`` and ``report.html`` into ``out_dir``.

        Each file is written atomically (a failed save leaves the earlier file whole). The HTML
        loads the shared ``plotly-<version>.min.js`` written beside it (``plotlyjs="inline"``
        embeds it instead; see :func:`cbscope.evaluate.render.html`).

        Raises:
            ConfigError: ``out_dir`` cannot hold the report (see :func:`check_report_dir`).
        """
        out = check_report_dir(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {key: out / name for key, name in REPORT_FILES.items()}
        texts = {
            "json": json.dumps(self.to_dict(), indent=1, default=_json_default) + "\n",
            "md": self.markdown(),
            "html": render.html(self, plotlyjs=plotlyjs, folder=out),
        }
        for key, path in files.items():
            atomic_write_text(path, texts[key])
        return files

    # ------------------------------------------------------------------ tables
    def attack_table(self) -> list[dict[str, Any]]:
        """One row per attack: base and CB success rates, CB on held-out split, n."""
        table = []
        for name, entry in self.attacks.items():
            held = entry.get("by_split", {}).get("heldout", {})
            trained = entry.get("by_split", {}).get("trained", {})
            table.append(
                {
                    "attack": name,
                    "base": entry.get("base"),
                    "cb": entry.get("cb"),
                    "cb_trained": trained.get("cb"),
                    "cb_heldout": held.get("cb"),
                    "cb_fired": (entry.get("outcomes", {}).get("cb") or {}).get("fired"),
                    "n": entry.get("n"),
                }
            )
        return table

    def source_table(self) -> list[dict[str, Any]]:
        """One row per (harmful source, attack): base and CB rates, n, and whether the breaker
        trained on that source (``seen``) or on some of the very prompts (``n_overlap``)."""
        sources = self.meta.get("data", {}).get("sources", {})
        table = []
        for name, entry in self.attacks.items():
            for src, e in entry.get("by_source", {}).items():
                facts = sources.get(src, {})
                table.append(
                    {
                        "source": src,
                        "attack": name,
                        "base": e.get("base"),
                        "cb": e.get("cb"),
                        "n": e.get("n"),
                        "seen": bool(facts.get("trained_on_source")),
                        "n_overlap": facts.get("n_overlap", 0),
                        "excluded": facts.get("excluded_trained", 0),
                        "known": facts.get("known", False),
                    }
                )
        return sorted(table, key=lambda r: (r["source"], list(self.attacks).index(r["attack"])))

    # ------------------------------------------------------------------ rendering
    def markdown(self) -> str:
        """The report as Markdown tables."""
        return render.markdown(self)

    def figures(self) -> dict[str, go.Figure]:
        """Plotly figures: ASR per attack, fine-tuning curves, soft-prompt loss."""
        return render.figures(self)

    def html(self) -> str:
        """A self-contained HTML page (plotly JavaScript inline, no network needed)."""
        return render.html(self)


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "__dataclass_fields__"):
        return asdict(value)
    return str(value)
