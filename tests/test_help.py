"""``--help`` of the gateway and the worker: every flag with its meaning, its default and its variable."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from common.settings import SECRETS
from gateway.config import GatewaySettings
from worker.config import WorkerSettings

ROOT = Path(__file__).resolve().parent.parent


def help_text(module: str) -> str:
    """The ``--help`` output of ``python -m <module>``, on one line: wide enough that argparse breaks no word."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBGATE_")}
    env["COLUMNS"] = "1000"
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return " ".join(result.stdout.split())


@pytest.mark.parametrize(("module", "settings"), [("gateway", GatewaySettings()), ("worker", WorkerSettings())])
def test_help_gives_every_flag_its_meaning_default_and_environment_variable(module: str, settings: Any) -> None:
    text = help_text(module)
    shown = [f for f in fields(settings) if f.name not in SECRETS]
    assert shown
    for f in shown:
        flag, var = "--" + f.name.replace("_", "-"), "JOBGATE_" + f.name.upper()
        switch = isinstance(getattr(settings, f.name), bool)  # a switch takes no value
        shape = rf", --no-{flag[2:]}" if switch else " [A-Z_]+"
        match = re.search(rf"{flag}{shape} (.*?) \(default: ([^;]*); env {var}\)", text)
        assert match, f"{flag} is not listed with a meaning, a default and {var}"
        meaning, default = match.groups()
        assert meaning.strip() and meaning == f.metadata["help"], f"{flag}: meaning {meaning!r}"
        value = getattr(settings, f.name)
        assert default == ("empty" if value == "" else str(value)), f"{flag}: default {default!r}"


def test_secrets_have_no_flag_but_help_names_their_environment_variable() -> None:
    text = help_text("gateway")
    secret = [f for f in fields(GatewaySettings) if f.name in SECRETS]
    assert secret
    for f in secret:
        assert "--" + f.name.replace("_", "-") + " " not in text
        assert f"JOBGATE_{f.name.upper()}: {f.metadata['help']}" in text
