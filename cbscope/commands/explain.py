"""``cbscope explain``: why does the breaker fire on one prompt? ``explain.json`` plus figures."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from cbscope.commands import USER_ERRORS, fail, set_threads


def explain_figures(explanation: object) -> list:
    """The figures of an explanation, in the order of the HTML page."""
    from cbscope import plots

    exp = explanation
    figures = []
    if exp.decomposition is not None:
        figures += [plots.block_share_heatmap(exp.decomposition, exp.focus.pos),
                    plots.block_effects(exp.decomposition, exp.focus.pos),
                    plots.share_heatmap(exp.decomposition)]
    if exp.patching is not None:
        figures.append(plots.patching_bars(exp.patching))
    if exp.attribution is not None:
        figures.append(plots.attribution_strip(exp.attribution))
    if exp.logit_lens is not None:
        figures.append(plots.logit_lens_heatmap(exp.logit_lens))
    if exp.direction is not None:
        figures.append(plots.direction_lines(exp.direction))
        if exp.direction.pca is not None:
            figures.append(plots.pca_scatter(exp.direction.pca))
    return figures


def explain(
    model: str = typer.Option("organism", help="Model spec: 'organism', 'smollm2-135m', a folder."),
    adapter: Path = typer.Option(..., help="Circuit-breaker adapter folder (peft)."),
    prompt: str = typer.Option(..., help="The user request."),
    prefill: str | None = typer.Option(
        None, help="Assistant text forced after the prompt (a prefilling attack)."),
    generate: int = typer.Option(
        0, help="Generate this many tokens with the circuit-broken model (after any prefill) "
                "and explain the whole sequence."),
    layers: str | None = typer.Option(
        None, help="Target layers, e.g. '9,19' (default: the adapter's own target layers)."),
    layer: int | None = typer.Option(
        None, help="Layer of the decomposition (default: the firing point's)."),
    threshold: float = typer.Option(0.5, help="Cosine below which the breaker counts as fired."),
    out: Path = typer.Option(..., help="Output folder: explain.json and explain.html."),
    device: str = typer.Option("cpu", help="Torch device."),
    threads: int = typer.Option(1, help="Torch threads."),
) -> None:
    """Why does the breaker fire? Decomposition, adapter patching, input attribution, logit lens
    and rerouting direction at the firing point; writes OUT/explain.json and OUT/explain.html."""
    from cbscope.data import check_prompt
    from cbscope.layers import parse_layers, validate_layers
    from cbscope.why.tokens import ExplainError, check_threshold

    set_threads(threads)
    try:
        check_prompt(prompt)
        check_threshold(threshold)
        if generate < 0:
            raise ExplainError(f"--generate must be >= 0, got {generate}")
        if out.exists() and not out.is_dir():
            raise ExplainError(f"--out {out} is a file: give a folder")
        chosen = parse_layers(layers)
        if not adapter.is_dir():
            raise FileNotFoundError(f"adapter folder {adapter} does not exist")
        from cbscope.pair import load_pair

        pair = load_pair(model, adapter, device=device)
        if chosen is not None:
            chosen = validate_layers(chosen, pair.n_layers)
        if layer is not None:
            validate_layers([layer], pair.n_layers)
    except (*USER_ERRORS, ExplainError) as err:
        raise fail(err) from err

    from cbscope.plots import save_html
    from cbscope.trace import trace_generation
    from cbscope.why import explain as run_explain
    from cbscope.why.tokens import encode, from_trace

    if generate > 0:
        generation = trace_generation(pair, prompt, prefill=prefill, max_new_tokens=generate,
                                      layers=[1])
        typer.echo(f"circuit-broken model generates: {generation.text_cb!r}")
        typer.echo(f"original model generates: {generation.text_orig!r}")
        seq = from_trace(generation.trace)
    else:
        seq = encode(pair, prompt, prefill or "")
    result = run_explain(pair, tokens=seq, layers=chosen, layer=layer, threshold=threshold,
                         show_progress=True)
    for line in result.describe():
        typer.echo(line)
    out.mkdir(parents=True, exist_ok=True)
    written = result.save(out / "explain.json")
    save_html(explain_figures(result), out / "explain.html", title=f"cbscope explain: {prompt[:60]}")
    (out / "summary.json").write_text(json.dumps(result.summary(), indent=2, default=str))
    typer.echo(f"wrote {written} and {out / 'explain.html'} ({result.seconds['total']:.1f} s)")


def register(app: typer.Typer) -> None:
    """Add ``explain``."""
    app.command("explain")(explain)
