"""``cbscope trace``: a Figure-6 cosine trace of one prompt, as HTML, JSON or CSV."""

from __future__ import annotations

from pathlib import Path

import typer

from cbscope.commands import USER_ERRORS, fail, set_threads
from cbscope.errors import ConfigError

OUT_SUFFIXES = (".html", ".json", ".csv")

#: Bad ``cbscope trace`` options: a :class:`~cbscope.errors.ConfigError` (the old name is kept).
TraceUsageError = ConfigError


def trace(
    model: str = typer.Option("organism", help="Model spec: 'organism', 'smollm2-135m', 'gemma3-270m', a folder."),
    adapter: Path = typer.Option(..., help="Circuit-breaker adapter folder (peft)."),
    prompt: str = typer.Option(..., help="The user request."),
    prefill: str | None = typer.Option(
        None, help="Assistant text forced after the prompt (a prefilling attack)."
    ),
    generate: int = typer.Option(
        0, help="Generate this many tokens with the circuit-broken model (after any prefill)."
    ),
    layers: str | None = typer.Option(
        None, help="Paper-convention layers to plot, e.g. '5,10,20' (default: Figure-6 layers)."
    ),
    threshold: float = typer.Option(
        0.5, help="Cosine below which the breaker counts as fired (a number in [-1, 1])."
    ),
    out: Path = typer.Option(..., help="Output file: .html (figures), .json (trace), .csv."),
    plotlyjs: str = typer.Option(
        "beside", help="HTML only: 'beside' (load one shared plotly.js written next to the page), "
        "'inline' (embed it: one self-contained file, 4.7 MB more) or 'cdn'."
    ),
    device: str = typer.Option("cpu", help="Torch device."),
    threads: int = typer.Option(1, help="Torch threads."),
) -> None:
    """Trace a prompt through the original and the circuit-broken model; report the firing point.

    Every layer is traced (the heatmap shows them all); --layers picks the plotted lines and the
    layers the firing point is looked for at (default: the Figure-6 layers, 5/10/20 of 32 scaled).
    """
    from cbscope.data import check_request_length, check_request_text, context_length
    from cbscope.export import PLOTLYJS_MODES
    from cbscope.io import check_output_file
    from cbscope.layers import figure6_layers, parse_layers, validate_layers
    from cbscope.pair import load_pair
    from cbscope.trace import check_threshold, cosine_trace, trace_generation

    set_threads(threads)
    try:  # every option is checked before the model loads, and the request before it runs
        out = check_output_file(out, suffixes=OUT_SUFFIXES)
        if out.suffix.lower() == ".json":  # the tensors go beside it
            check_output_file(out.with_suffix(".safetensors"), option="--out (its tensors)")
        threshold = check_threshold(threshold, "--threshold")
        if generate < 0:
            raise ConfigError(f"--generate must be >= 0, got {generate}")
        if plotlyjs not in PLOTLYJS_MODES:
            raise ConfigError(f"--plotlyjs must be one of {', '.join(PLOTLYJS_MODES)}, "
                              f"not {plotlyjs!r}")
        check_request_text(prompt, prefill or "")
        chosen = parse_layers(layers)
        if not adapter.is_dir():
            raise FileNotFoundError(f"adapter folder {adapter} does not exist")
        pair = load_pair(model, adapter, device=device)
        chosen = validate_layers(
            figure6_layers(pair.n_layers) if chosen is None else chosen, pair.n_layers
        )
        check_request_length(pair.tokenizer, prompt, prefill or "", context=context_length(pair),
                             gen_tokens=generate)
    except USER_ERRORS as err:
        raise fail(err) from err

    texts = {}
    if generate > 0:
        result = trace_generation(pair, prompt, prefill=prefill, max_new_tokens=generate)
        result_trace = result.trace
        texts = {"circuit-broken": result.text_cb, "original": result.text_orig}
    else:
        result_trace = cosine_trace(pair, [prompt], [prefill or ""])
        if prefill:
            result_trace.prefill_end = [len(result_trace.tokens[0])]

    for name, text in texts.items():
        typer.echo(f"{name} model generates: {text!r}")
    start = result_trace.response_start[0]
    if start >= result_trace.lengths[0]:
        typer.echo("no response tokens (give --prefill or --generate): nothing can fire")
    else:
        point = result_trace.firing_point(threshold, chosen)
        where = f"at layers {chosen}"
        if point is None:
            low = result_trace.min_cos(0, chosen)
            typer.echo(
                f"the circuit breaker does not fire {where} (threshold {threshold:g}; lowest "
                f"response cosine {low:.2f})"
            )
        else:
            typer.echo(f"the circuit breaker {point.describe()}")

    from cbscope.io import atomic_write

    suffix = out.suffix.lower()
    if suffix == ".html":
        from cbscope.plots import cosine_heatmap, figure6_lines, norm_lines, save_html

        figures = [
            figure6_lines(result_trace, 0, chosen, threshold),
            cosine_heatmap(result_trace, 0),
            norm_lines(result_trace, 0, chosen),
        ]
        save_html(figures, out, title=f"cbscope trace: {prompt[:60]}", plotlyjs=plotlyjs,
                  before=request_html(prompt, prefill or "", texts))
        written = out
    elif suffix == ".json":
        written = result_trace.save(out)
    else:
        written = atomic_write(out, lambda tmp: result_trace.to_dataframe().to_csv(tmp, index=False))
    typer.echo(f"wrote {written}")


def request_html(prompt: str, prefill: str, texts: dict[str, str]) -> str:
    """The request, the prefill and each model's generation as escaped plain text (the top of
    the trace page)."""
    import html

    box = ("white-space:pre-wrap;font-family:monospace;border:1px solid #ddd;border-radius:6px;"
           "padding:6px 8px;margin:4px 0 10px 0")

    def block(title: str, text: str, cls: str) -> str:
        return (f"<div><b>{html.escape(title)}</b><div class='{cls}' style='{box}'>"
                f"{html.escape(text) or '<i>(empty)</i>'}</div></div>")

    parts = [block("Request", prompt, "cbscope-request")]
    if prefill:
        parts.append(block("Prefill (forced)", prefill, "cbscope-prefill"))
    for name, title in (("original", "Original model (adapter off) generates"),
                        ("circuit-broken", "Circuit-broken model (adapter on) generates")):
        if name in texts:
            parts.append(block(title, texts[name], "cbscope-generation"))
    return "<div style='font-family:sans-serif;max-width:1100px'>" + "".join(parts) + "</div>"


def register(app: typer.Typer) -> None:
    """Add ``trace``."""
    app.command("trace")(trace)
