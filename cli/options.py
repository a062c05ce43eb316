"""The command line's app and what its commands share: choice enums from mixem.config, and common options."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from mixem import methods
from mixem.cli.errors import Debug, set_debug
from mixem.config import EMBED_FEATURES, ENGINES, EXPORT_FORMATS, IMPLS, KMEANS_INITS, PRESETS

app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    help="Fast unsupervised image classification (MIX'EM): train, evaluate, export, embed, classify, cluster, bench.",
)


def choice_enum(name: str, values) -> type[Enum]:
    """A str Enum for Typer from one of the package's own choice lists (mixem.config): one source of truth."""
    return Enum(name, {v: v for v in values}, type=str)


Preset = choice_enum("Preset", ("auto", *PRESETS))
Method = choice_enum("Method", methods.REGISTRY)
Impl = choice_enum("Impl", IMPLS)
ExportFormat = choice_enum("ExportFormat", EXPORT_FORMATS)
EmbedEngine = choice_enum("EmbedEngine", ENGINES)
EmbedFeatures = choice_enum("EmbedFeatures", EMBED_FEATURES)
ClusterInit = choice_enum("ClusterInit", KMEANS_INITS)


Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Print only the final result.")]
JsonLog = Annotated[Path | None, typer.Option("--json-log", help="Append JSON-lines events to this file.")]
Device = Annotated[str | None, typer.Option("--device", help="auto | cpu | cuda | cuda:N")]
Seed = Annotated[int | None, typer.Option("--seed", help="Random seed.")]


@app.callback()
def main_options(debug: Debug = False):
    """Fast unsupervised image classification (MIX'EM): train, evaluate, export, embed, classify, cluster, bench."""
    set_debug(debug)
