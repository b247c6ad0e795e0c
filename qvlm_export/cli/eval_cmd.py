"""``qvlm-export eval``: task accuracy per question type of a model, quant state or bundle."""

from __future__ import annotations

from typing import Annotated

import typer

from . import app
from .options import JsonOut, NoVerify, require_path, writing


@app.command("eval")
def eval_command(
    model: Annotated[str | None, typer.Option(help="Hugging Face LLaVA-family directory (default: embedded model)")] = None,
    data: Annotated[str, typer.Option(help="JSONL manifest or builtin:eval / builtin:calib / builtin:eval:N")] = "builtin:eval",
    quant: Annotated[str | None, typer.Option(help="quant-state directory: evaluate the simulated quantized model")] = None,
    bundle: Annotated[str | None, typer.Option(help="ONNX bundle directory: evaluate on ONNX Runtime")] = None,
    engines: Annotated[str | None, typer.Option(help="TensorRT engine directory")] = None,
    mode: Annotated[str, typer.Option(help="ONNX Runtime session mode for --bundle: faithful | fast")] = "faithful",
    int4_accuracy_level: Annotated[int | None, typer.Option(
        help="fast mode's int4 MatMulNBits compute: 1 fp32, 2 fp16, 3 bf16, 4 int8 (default: ORT's, 4)")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 32,
    limit: Annotated[int | None, typer.Option(min=1, help="evaluate only the first N samples (at most the data's)")] = None,
    json_out: JsonOut = None,
    text: Annotated[bool, typer.Option(help="also the language model's perplexity on English text (real-LM models)")] = False,
    text_tokens: Annotated[int, typer.Option(min=2, help="tokens of English text scored (--text)")] = 3072,
    text_window: Annotated[int, typer.Option(min=2, help="tokens per scored window of English text (--text)")] = 512,
    no_verify: NoVerify = False,
) -> None:
    """Greedy exact-match accuracy, per question type and overall."""
    import dataclasses

    from rich.console import Console
    from rich.table import Table

    from ..data.manifest import load_dataset
    from ..errors import QvlmError
    from ..evaluate.accuracy import evaluate
    from ..evaluate.backends import make_answerer
    from ..evaluate.text import TextSpec

    for value, flag in ((model, "--model"), (quant, "--quant"), (bundle, "--bundle"), (engines, "--engines")):
        require_path(value, flag)
    text_spec = TextSpec(text_tokens, text_window)  # a bad pair fails here, before any model loads
    with writing(None, json_out):
        samples = load_dataset(data)
        if limit is not None and limit > len(samples):  # refused, not clamped: n is what the result claims
            raise QvlmError(f"--limit {limit} is more than the {len(samples)} samples in {data!r}; pass --limit "
                            f"{len(samples)} or less, or leave it out")
        samples = samples[:limit] if limit is not None else samples
        answerer, info = make_answerer(model=model, quant=quant, bundle=bundle, engines=engines, mode=mode,
                                       int4_accuracy=int4_accuracy_level)
        result = evaluate(answerer, samples, batch_size=batch_size)
        if text:
            from ..evaluate.text import answerer_text_scores

            scores = answerer_text_scores(answerer, text_spec)
            result = dataclasses.replace(result, text={"perplexity": scores.perplexity, "tokens": scores.tokens})
        if json_out:
            result.write_json(json_out)
    table = Table(title=f"accuracy ({info.get('backend', '?')}, setting {info.get('setting', 'fp')}, "
                        f"n={len(samples)} of {data})")
    table.add_column("question type")
    table.add_column("accuracy", justify="right")
    for qtype, acc in result.by_type.items():
        table.add_row(qtype, f"{acc:.4f}")
    table.add_row("overall", f"{result.overall:.4f}", style="bold")
    if result.text is not None:
        table.add_row(f"perplexity ({result.text['tokens']} tokens of English)", f"{result.text['perplexity']:.4f}")
    Console().print(table)
