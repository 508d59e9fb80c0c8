"""The ``convfuse`` command: parse, call the library, render the report, map errors to exit codes.

Exit codes (DESIGN.md): 0 success (also "nothing to fuse"); 1 the model failed a check
(verification or --strict), nothing written; 2 the user must fix something, nothing written;
3 an internal error (a bug of convfuse).
The report goes to stdout, errors and warnings to stderr; colour and spinners only on a terminal
(NO_COLOR is honoured), elsewhere one progress line on stdout per finished step (-q: none), before
the tables; the last line of stdout is always a one-line summary.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from convfuse import __version__
from convfuse.cli.display import console
from convfuse.cli.run import run
from convfuse.errors import CheckFailed, ConvfuseError

__all__ = ["app", "main"]

app = typer.Typer(
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        import torch

        typer.echo(f"convfuse {__version__} (torch {torch.__version__})")
        raise typer.Exit(0)


@app.command(no_args_is_help=True)
def convfuse(
    input: Annotated[
        Optional[Path],
        typer.Argument(
            help="Model file: torch.save of a whole model or of a state_dict (with --arch), a training "
            "framework's checkpoint holding either (ultralytics, Lightning, timm, a training loop's dict), "
            "a safetensors file (with --arch), a TorchScript archive, or an ExportedProgram (.pt2). Omit it with --arch to fuse "
            "a freshly built architecture (a demo: its BatchNorm statistics are randomised, as "
            "trained ones would be, so that folding them shows).",
            show_default=False,
            metavar="INPUT",
        ),
    ] = None,
    output: Annotated[
        Optional[Path], typer.Option("-o", "--output", help="Where to write the fused model.", show_default=False, metavar="OUTPUT")
    ] = None,
    input_shape: Annotated[
        Optional[list[str]],
        typer.Option(
            "--input-shape",
            metavar="SHAPE",
            help="Shape of a positional input, e.g. 1,3,224,224; repeat for several inputs. "
            "Default: inferred from the first layer.",
            show_default=False,
        ),
    ] = None,
    dtype: Annotated[
        Optional[str],
        typer.Option(help="dtype of the generated inputs (float32, float16, bfloat16, float64). Default: the model's.",
                     show_default=False),
    ] = None,
    atol: Annotated[
        Optional[float], typer.Option(help="Absolute tolerance for verification. Default: from the model's own rounding error.",
                                      show_default=False)
    ] = None,
    rtol: Annotated[
        Optional[float],
        typer.Option(help="Tolerance relative to each output's largest magnitude. Default: from the model's own rounding error.",
                     show_default=False),
    ] = None,
    report: Annotated[
        Optional[Path], typer.Option("--report", metavar="PATH.json", help="Write the JSON report here.", show_default=False)
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Analyse and verify; write no model.")] = False,
    strict: Annotated[bool, typer.Option("--strict", help="Fail (exit 1) when any BatchNorm is left unfused.")] = False,
    arch: Annotated[
        Optional[str],
        typer.Option(help="Architecture for a state_dict: a torchvision model name (resnet50), timm:NAME (any "
                     "timm.create_model name) or package.module:factory.", show_default=False),
    ] = None,
    prefix: Annotated[
        Optional[str],
        typer.Option("--prefix", metavar="PREFIX",
                     help="The state_dict's key prefix to strip, e.g. model. (its other keys are kept as they are). "
                     "Default: module., _orig_mod. or model. where all keys have it and that makes them fit --arch.",
                     show_default=False),
    ] = None,
    allow: Annotated[
        Optional[list[str]],
        typer.Option(
            "--allow",
            metavar="PACKAGE",
            envvar="CONVFUSE_ALLOW",
            help="Let the file name classes of this installed package too (besides torch, torchvision, timm); "
            "repeatable. Environment: CONVFUSE_ALLOW (packages separated by spaces or commas).",
            show_default=False,
        ),
    ] = None,
    trust: Annotated[
        bool,
        typer.Option("--trust", help="Load anything: any pickle, TorchScript, any .pt2. This runs code from the file. "
                     "Only for files you trust."),
    ] = False,
    format: Annotated[
        Optional[str],
        typer.Option("--format", help="Output format: pickle (the model, or the checkpoint it came in), torchscript, "
                     "exported, state_dict or safetensors (the fused weights alone). Default: the input's; a .pt2, "
                     ".safetensors or .ts output name implies its format.", show_default=False),
    ] = None,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip verification (the report says so).")] = False,
    reparam: Annotated[
        bool,
        typer.Option("--reparam", help="Also merge blocks that sum conv branches on one input (RepVGG, MobileOne) "
                     "into one conv; changes those blocks' structure."),
    ] = False,
    eval_mode: Annotated[
        bool, typer.Option("--eval", help="Put a model saved in training mode into eval mode before fusing.")
    ] = False,
    overwrite_input: Annotated[
        bool, typer.Option("--overwrite-input", help="Allow OUTPUT to be the INPUT file (it is replaced atomically).")
    ] = False,
    device: Annotated[
        Optional[str], typer.Option(help="Run on this device, e.g. cuda (default: cpu).", show_default=False)
    ] = None,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Print only the one-line summary.")] = False,
    version: Annotated[
        Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = None,
) -> None:
    """Fold BatchNorm into the conv/linear layers beside it, verify the outputs, and save.

    Exit codes: 0 success (also nothing to fuse); 1 the model failed a check (verification or
    --strict), nothing written; 2 a problem to fix (usage, unreadable or unsafe input,
    unwritable output), nothing written; 3 an internal error (a bug of convfuse:
    CONVFUSE_DEBUG=1 shows the traceback), nothing written.
    """
    out = console(sys.stdout)
    err = console(sys.stderr)
    try:
        run(locals(), out)
    except CheckFailed as error:
        err.print(f"convfuse: {error}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(error.exit_code) from None
    except ConvfuseError as error:
        err.print(f"convfuse: error: {error}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(error.exit_code) from None
    except KeyboardInterrupt:
        err.print("convfuse: interrupted; nothing written", markup=False)
        raise typer.Exit(130) from None
    except typer.Exit:
        raise
    except SystemExit as error:  # the model's own code (its forward, a class it imports) exited
        err.print(
            f"convfuse: error: the model's code called sys.exit({error.code!r}) while convfuse ran it; "
            "nothing written",
            markup=False, highlight=False, soft_wrap=True,
        )
        raise typer.Exit(2) from None
    except Exception as error:  # a bug of ours: say so plainly, no traceback unless asked
        if os.environ.get("CONVFUSE_DEBUG"):
            raise
        err.print(
            f"convfuse: internal error: {type(error).__name__}: {error}. This is a bug in convfuse; "
            "please report it (set CONVFUSE_DEBUG=1 for the traceback).",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(3) from None


def main() -> None:
    """Entry point of the ``convfuse`` script and ``python -m convfuse``."""
    warnings.filterwarnings("ignore", category=FutureWarning, module="torchvision")
    app(prog_name="convfuse")
