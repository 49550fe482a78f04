"""The promotion gate's command-line options, shared by `graft train`, `publish` and `push`
(light: `graft --help` builds them without loading the gate's code)."""

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

DEFAULT_MAX_REGRESSION = 0.01


class PromoteMode(StrEnum):
    GATED = "gated"  # measured against the active version: promoted or rejected
    ALWAYS = "always"  # promoted at once, not measured
    NEVER = "never"  # measured when it can be, kept as a candidate for an operator


Promote = Annotated[
    PromoteMode,
    typer.Option(
        "--promote",
        help="gated: serve the new version only if it is no worse than the active one on "
        "held-out images; always: serve it at once; never: keep it a candidate (`graft promote`)",
    ),
]
GateData = Annotated[
    Path | None,
    typer.Option(
        "--gate-data",
        help="held-out images for the promotion gate, one folder per class like a training "
        "folder [default for `graft train`: the test split]",
    ),
]
MaxRegression = Annotated[
    float,
    typer.Option(
        "--max-regression",
        help="how far accuracy and macro-F1 may fall below the active version's (0 to 1)",
    ),
]
