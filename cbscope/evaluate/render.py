"""The report as Markdown, as a self-contained HTML page, and as plotly figures.

The HTML page is the Markdown rendered by markdown-it-py (CommonMark with tables, raw HTML
escaped) with the figures' plotly JavaScript inline, so it works offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from markdown_it import MarkdownIt

from cbscope.attacks.multiturn import MULTITURN_ATTACKS

if TYPE_CHECKING:
    import plotly.graph_objects as go

__all__ = ["ReportView", "figures", "html", "markdown", "pct"]

_MARKDOWN = MarkdownIt("commonmark", {"html": False}).enable("table")

_CSS = (
    "body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;"
    "color:#222}"
    "table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;"
    "padding:4px 10px}th{background:#f3f3f3}"
    "code{background:#f3f3f3;padding:1px 4px}"
)


class ReportView(Protocol):
    """What rendering reads of a :class:`~cbscope.evaluate.Report`."""

    attacks: dict[str, Any]
    capability: dict[str, Any]
    over_refusal: dict[str, Any]
    finetune_attack: dict[str, Any]
    firing: dict[str, Any]
    meta: dict[str, Any]

    def attack_table(self) -> list[dict[str, Any]]: ...

    def source_table(self) -> list[dict[str, Any]]: ...


def pct(value: float | None) -> str:
    """``0.125`` -> ``"12.5%"``; ``None`` -> ``"-"``."""
    return "-" if value is None else f"{100 * value:.1f}%"


def markdown(report: ReportView) -> str:
    """The report as Markdown tables."""
    m = report.meta
    lines = [
        "# cbscope evaluation report",
        "",
        f"- model: `{m.get('model')}`; adapter: `{m.get('adapter')}`; suite: {m.get('suite')}",
        f"- judge: {m.get('judge')}; greedy decoding, {m.get('max_new_tokens')} new tokens",
        f"- held-out categories: {m.get('data', {}).get('heldout_categories', '-')}",
        f"- total time: {m.get('seconds', 0):.1f} s",
        "",
        "## Attacks (attack success rate)",
        "",
        "| attack | base | CB | CB trained | CB held-out | CB fired | n |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report.attack_table():
        lines.append(
            f"| {row['attack']} | {pct(row['base'])} | {pct(row['cb'])} | "
            f"{pct(row['cb_trained'])} | {pct(row['cb_heldout'])} | "
            f"{pct(row['cb_fired'])} | "
            f"{row['n']} |"
        )
    lines += _source_lines(report)
    lines += ["", *_settings_lines(report)]
    lines += ["", "## Capability", "", "| metric | base | CB | n |", "|---|---:|---:|---:|"]
    for metric, entry in report.capability.items():
        if metric == "retain":
            continue
        lines.append(f"| {metric} | {pct(entry['base'])} | {pct(entry['cb'])} | {entry['n']} |")
    retain = report.capability.get("retain")
    if retain:
        lines += [
            "",
            f"Retain text ({retain['n']} examples, {retain['n_tokens']} tokens): "
            f"KL(base‖CB) = {retain['kl']:.3g} nats/token, perplexity base "
            f"{retain['ppl_base']:.3f} vs CB {retain['ppl_cb']:.3f}.",
        ]
    lines += [
        "",
        "## Over-refusal (refused or breaker fired on benign look-alikes)",
        "",
        "| set | base | CB | refused base | refused CB | fired base | fired CB | n |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, e in report.over_refusal.items():
        lines.append(
            f"| {name} | {pct(e['base'])} | {pct(e['cb'])} | {pct(e['refused']['base'])} | "
            f"{pct(e['refused']['cb'])} | {pct(e['fired']['base'])} | "
            f"{pct(e['fired']['cb'])} | "
            f"{e['n']} |"
        )
    ft = report.finetune_attack
    if ft:
        lines += ["", "## Fine-tuning attack (ASR by step)", ""]
        steps = ft["curves"][0]["steps"]
        lines.append("| curve | " + " | ".join(str(s) for s in steps) + " | steps to 50% |")
        lines.append("|---|" + "---:|" * (len(steps) + 1))
        for c in ft["curves"]:
            cells = " | ".join(pct(a) for a in c["asr"])
            lines.append(f"| {c['mode']} lr={c['lr']:g} | {cells} | {c['steps_to_50'] or '-'} |")
    curved = {name: e for name, e in report.attacks.items() if e.get("curves")}
    if curved:
        lines += ["", "## Optimising attacks (ASR by budget)", ""]
        lines += ["| attack | mode | budget: ASR |", "|---|---|---|"]
        for name, e in curved.items():
            for mode, points in e["curves"].items():
                # only the budgets where the rate changes (and the last one)
                shown = [
                    (b, a)
                    for i, (b, a) in enumerate(points)
                    if i == 0 or i == len(points) - 1 or a != points[i - 1][1]
                ]
                cells = ", ".join(f"{b:g}: {pct(a)}" for b, a in shown)
                lines.append(f"| {name} | {mode} | {cells} |")
    sweep = m.get("finetune_worst") or {}
    for mode, info in sweep.items():
        chosen = info.get("chosen")
        lines += [
            "",
            f"## Worst-case fine-tuning ({mode}; benign exact match down at most "
            f"{info['max_em_drop'] * 100:g} points)",
            "",
            "| lr | seed | steps | ASR | benign EM | EM drop | within bound |",
            "|---:|---:|---:|---:|---:|---:|---|",
        ]
        for g in info["grid"]:
            mark = " (worst)" if g == chosen else ""
            lines.append(
                f"| {g['lr']:g} | {g['seed']} | {g['steps']} | {pct(g['asr'])} | "
                f"{pct(g['benign_em'])} | {g['em_drop'] * 100:.1f} | "
                f"{'yes' if g['admissible'] else 'no'}{mark} |"
            )
    lines += ["", "## Firing statistics", ""]
    trace = report.firing.get("trace")
    if trace:
        splits = ", ".join(f"{k} {pct(v)}" for k, v in trace["by_split"].items())
        lines.append(
            f"Cosine trace (threshold {m.get('firing_threshold')}): fires on "
            f"{pct(trace['firing_rate'])} of {trace['n_harmful']} harmful examples "
            f"(by split: {splits or '-'}), "
            f"on {pct(trace['false_fire_rate'])} of {trace['n_benign']} benign ones; median "
            f"firing position {trace['median_pos_after_start']} tokens after the response "
            "start."
        )
    else:
        lines.append(f"Cosine-trace firing statistics: {m.get('firing_note', 'not computed')}.")
    lines += ["", "Degenerate (breaker fired) share of responses:", ""]
    lines += ["| attack | base | CB |", "|---|---:|---:|"]
    for name, e in report.firing.get("outputs", {}).items():
        lines.append(f"| {name} | {pct(e['base'])} | {pct(e['cb'])} |")
    timings = m.get("timings", {})
    if timings:
        lines += ["", "## Timings (s)", ""]
        lines += [f"- {k}: {v:.1f}" for k, v in timings.items()]
    return "\n".join(lines) + "\n"


def _source_lines(report: ReportView) -> list[str]:
    table = report.source_table()
    if not table:
        return []
    lines = [
        "",
        "## Attacks by harmful source",
        "",
        "| source | trained on this source? | attack | base | CB | n |",
        "|---|---|---|---:|---:|---:|",
    ]
    for row in table:
        if row["n_overlap"]:
            seen = f"**yes: {row['n_overlap']} evaluated prompts were trained on**"
        elif row["seen"]:
            seen = "yes (held-out rows)"
        else:
            seen = "no (unseen source)" if row["known"] else "unknown (adapter records none)"
        if row["excluded"]:
            seen += f"; {row['excluded']} rows it trained on left out"
        lines.append(
            f"| {row['source']} | {seen} | {row['attack']} | {pct(row['base'])} | "
            f"{pct(row['cb'])} | {row['n']} |"
        )
    flagged = sorted({r["source"] for r in table if r["seen"]})
    if flagged:
        lines += [
            "",
            f"Flagged: the breaker was trained on {', '.join(flagged)}; rows of a trained "
            "source measure in-distribution phrasing, not generalisation to an unseen source.",
        ]
    return lines


def _settings_lines(report: ReportView) -> list[str]:
    """One line per configurable attack: what was run."""
    m = report.meta
    config = m.get("config", {})
    lines = ["Attack settings:", ""]
    soft = m.get("soft_prompt", {})
    if soft:
        sp = config.get("soft_prompt", {})
        hits = ", ".join(
            f"{mode}: target hit {pct(v.get('target_hit_rate'))}, "
            f"mean {v.get('mean_steps_used', 0):.1f} steps"
            for mode, v in soft.items()
        )
        target = config.get("soft_prompt_target") if m.get("suite") == "organism" else "target"
        lines.append(
            f"- soft_prompt: {sp.get('n_tokens')} vectors, <= {sp.get('steps')} signed-gradient "
            f"steps of {sp.get('step_size')} x embedding RMS, target {target!r}; {hits}"
        )
    if any(name in report.attacks for name in MULTITURN_ATTACKS):
        first = (
            "a chat-seen benign request and its answer"
            if m.get("suite") == "organism"
            else "a fixed harmless exchange"
        )
        lines.append(
            f"- multiturn / multiturn_prefill: turn 1 {first}, turn 2 the harmful request "
            "(multiturn_prefill: its answer prefilled like the prefill attack)"
        )
    repe = m.get("repe", {})
    if repe:
        info = next(iter(repe.values()))
        lines.append(
            f"- repe: {config.get('repe_direction')} direction, layers {info.get('layers')}, "
            f"coeff {info.get('coeff')}, positions {info.get('positions')!r}"
        )
    if report.finetune_attack:
        ft = config.get("finetune", {})
        lines.append(
            f"- finetune: fresh LoRA (r={ft.get('rank')}) on a merged copy, "
            f"{ft.get('n_examples')} harmful examples, batch {ft.get('batch_size')}, "
            f"{ft.get('steps')} steps, lrs {ft.get('lrs')}; evaluated on "
            f"{report.attacks.get('finetune', {}).get('n')} other harmful requests"
        )
    return lines if len(lines) > 2 else []


def figures(report: ReportView) -> dict[str, go.Figure]:
    """Plotly figures: ASR per attack, fine-tuning curves, soft-prompt loss, ASR vs budget."""
    import plotly.graph_objects as go

    figs: dict[str, go.Figure] = {}
    names = list(report.attacks)
    bar = go.Figure()
    for mode, color in (("base", "#888888"), ("cb", "#d62728")):
        bar.add_bar(
            name="base" if mode == "base" else "circuit-broken",
            x=names,
            y=[(report.attacks[n].get(mode) or 0.0) * 100 for n in names],
            marker_color=color,
            text=[pct(report.attacks[n].get(mode)) for n in names],
        )
    bar.update_layout(
        title="Attack success rate",
        yaxis_title="ASR (%)",
        yaxis_range=[0, 105],
        barmode="group",
        template="plotly_white",
        height=380,
    )
    figs["asr"] = bar
    if report.finetune_attack:
        ft = go.Figure()
        for c in report.finetune_attack["curves"]:
            ft.add_scatter(
                x=c["steps"],
                y=[(a or 0.0) * 100 for a in c["asr"]],
                mode="lines+markers",
                name=f"{'CB' if c['mode'] == 'cb' else 'base'} lr={c['lr']:g}",
                line={"dash": "dash" if c["mode"] == "base" else "solid"},
            )
        ft.update_layout(
            title="Fine-tuning attack: ASR vs steps",
            xaxis_title="fine-tuning step",
            yaxis_title="ASR (%)",
            yaxis_range=[0, 105],
            template="plotly_white",
            height=380,
        )
        figs["finetune"] = ft
    soft = report.meta.get("soft_prompt", {})
    if soft:
        fig = go.Figure()
        for mode, info in soft.items():
            fig.add_scatter(y=info.get("loss_curve", []), mode="lines", name=mode)
        fig.update_layout(
            title="Soft-prompt attack: mean target loss",
            xaxis_title="step",
            yaxis_title="cross-entropy",
            template="plotly_white",
            height=340,
        )
        figs["soft_prompt"] = fig
    curved = {name: entry for name, entry in report.attacks.items() if entry.get("curves")}
    if curved:
        fig = go.Figure()
        for name, entry in curved.items():
            unit = entry.get("budget", {}).get("unit", "steps")
            for mode, points in entry["curves"].items():
                fig.add_scatter(
                    x=[b for b, _ in points],
                    y=[(a or 0.0) * 100 for _, a in points],
                    mode="lines+markers",
                    name=f"{name} {'CB' if mode == 'cb' else 'base'} ({unit})",
                    line={"dash": "dash" if mode == "base" else "solid"},
                )
        fig.update_layout(
            title="Optimising attacks: ASR vs budget",
            xaxis_title="budget (steps)",
            yaxis_title="ASR (%)",
            yaxis_range=[0, 105],
            template="plotly_white",
            height=380,
        )
        figs["budget_curves"] = fig
    return figs


def html(report: ReportView, *, plotlyjs: str = "inline", folder: Path | None = None) -> str:
    """The report as an HTML page.

    Args:
        report: The report.
        plotlyjs: ``"inline"`` (default: one self-contained page, plotly.js embedded once),
            ``"beside"`` (load the shared ``plotly-<version>.min.js`` written into ``folder``,
            so a folder of reports holds one copy) or ``"cdn"``
            (:func:`cbscope.export.plotlyjs_tag`).
        folder: Where the page is written (``"beside"`` only).
    """
    from cbscope.export import plotlyjs_tag

    body = _MARKDOWN.render(markdown(report))
    head, _, rest = body.partition("<h2>")
    script = plotlyjs_tag(plotlyjs, folder)  # type: ignore[arg-type]
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>cbscope report</title>"
        f"<style>{_CSS}</style>{script}</head><body>\n{head}\n<div class='figs'>"
        f"{_figures_html(report)}</div>\n<h2>{rest}\n</body></html>\n"
    )


def _figures_html(report: ReportView) -> str:
    import plotly.io as pio

    return "\n".join(
        pio.to_html(fig, include_plotlyjs=False, full_html=False, default_width="100%")
        for fig in figures(report).values()
    )
