"""MkDocs hook: the command-line reference, generated at build time from the code itself.

A page holding `<!-- geosoc-cli -->` gets typer's own Markdown for every `geosoc` command and option
(`python -m typer geosoc.cli utils docs`); one holding `<!-- geosoc-jobs -->` gets the `--help` of each Ray
job (`geosoc.jobs.job_parser`). Both fail the build when they cannot be made, rather than leave a page empty.
"""

from __future__ import annotations

import argparse
import html
import re
import subprocess
import sys
from typing import Any

CLI_MARKER = "<!-- geosoc-cli -->"
JOBS_MARKER = "<!-- geosoc-jobs -->"
JOB_STAGES = ("pretrain", "finetune", "predict")
HELP_WIDTH = 100  # argparse wraps to the terminal; a fixed width keeps the page the same on every machine


def cli_markdown() -> str:
    """Every command of the `geosoc` typer app, its options, defaults and environment variables."""
    done = subprocess.run([sys.executable, "-m", "typer", "geosoc.cli", "utils", "docs", "--name", "geosoc"],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0 or "## `geosoc " not in done.stdout:
        raise RuntimeError(f"typer could not document geosoc.cli (exit {done.returncode}): {done.stderr[-2000:]}")
    # typer escapes HTML everywhere, which code spans would show literally (`&lt;model&gt;`): unescape those.
    text = re.sub(r"`[^`\n]+`", lambda span: html.unescape(span.group(0)), done.stdout)
    # One level down: the page's own title is the only level-1 heading.
    return re.sub(r"^(#+) ", r"#\1 ", text, flags=re.MULTILINE)


def jobs_markdown() -> str:
    """The `--help` of jobs/pretrain.py, jobs/finetune.py and jobs/predict.py, from the parser they use."""
    from geosoc.jobs import job_parser

    parts = []
    for stage in JOB_STAGES:
        parser = job_parser(stage)
        parser.prog = f"python jobs/{stage}.py"
        parser.formatter_class = lambda prog: argparse.HelpFormatter(prog, width=HELP_WIDTH)
        parts.append(f"### `jobs/{stage}.py`\n\n```\n{parser.format_help().rstrip()}\n```\n")
    return "\n".join(parts)


def on_page_markdown(markdown: str, **_: Any) -> str:
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, cli_markdown())
    if JOBS_MARKER in markdown:
        markdown = markdown.replace(JOBS_MARKER, jobs_markdown())
    return markdown
