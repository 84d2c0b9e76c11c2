"""CLI command ``edgekd models``: the students edgekd ships and the timm edge networks it recommends."""

from __future__ import annotations

from typing import Annotated

import typer

from edgekd import ui
from edgekd.cli_options import JsonOpt, emit


def models(
    input_size: Annotated[int, typer.Option(min=16, max=1024, help="Input side for the MAC count.")] = 28,
    in_chans: Annotated[int, typer.Option(min=1, max=4, help="Input channels for students.")] = 1,
    num_classes: Annotated[int, typer.Option(min=2, help="Classes for the head.")] = 10,
    as_json: JsonOpt = False,
) -> None:
    """List edgekd's students (nano < 100K params, small) and the timm edge networks it recommends,
    with parameters and MACs at --input-size (timm networks take 3 channels).

    Any timm model name works as a student (--set student.model=NAME) or teacher.
    """
    from edgekd.models import RECOMMENDED_TIMM, count_macs, count_params, create_model, list_students  # lazy: `edgekd --help` and light commands import no torch/onnx

    rows = []
    for spec in list_students():
        m = create_model(spec.name, num_classes, in_chans=in_chans)
        rows.append({"name": spec.name, "family": spec.family, "params": count_params(m), "macs": count_macs(m, input_size, in_chans), "about": spec.doc})
    for name, about in RECOMMENDED_TIMM.items():
        m = create_model(name, num_classes, input_size=input_size)
        rows.append({"name": name, "family": "timm", "params": count_params(m), "macs": count_macs(m, input_size, 3), "about": about})
    ui.show(ui.table(f"students at {input_size}x{input_size} (edgekd: {in_chans} channel(s), timm: 3)", ["name", "family", "params", "MMACs", "about"],
                     [[r["name"], r["family"], f"{r['params']:,}", f"{r['macs'] / 1e6:.1f}", r["about"]] for r in rows]))
    emit({"models": rows}, as_json)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the edgekd app."""
    app.command("models")(models)
