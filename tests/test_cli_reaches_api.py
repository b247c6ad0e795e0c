"""Every option of a stage's config is reachable from its command's flags (the CLI cannot drift from the API)."""

from __future__ import annotations

import dataclasses

import pytest
import typer

import qvlm_export.cli as cli
from qvlm_export.export.config import ExportConfig
from qvlm_export.validate.config import ValidateConfig

# Flag names that differ from the field they set.
RENAMED = {"eval_data": "data"}
# Tracing internals (example shapes of the dynamo trace, the attention kernel TensorRT needs): run config only.
EXPORT_INTERNALS = {"example_batch", "example_seq", "example_past", "attn_implementation"}


def _flags(command: str) -> set[str]:
    cli._register()
    return {p.name for p in typer.main.get_command(cli.app).commands[command].params}


@pytest.mark.parametrize(("command", "config", "internal"), [
    ("validate", ValidateConfig, set()),
    ("export", ExportConfig, EXPORT_INTERNALS),
])
def test_every_config_field_has_a_flag(command, config, internal):
    fields = {f.name for f in dataclasses.fields(config)} - {"version"} - internal
    missing = {RENAMED.get(f, f) for f in fields} - _flags(command)
    assert missing == set()


def test_internal_export_fields_are_reachable_through_the_run_config():
    from qvlm_export.pipeline_config import run_config_from_dict

    config = run_config_from_dict({"export": {name: 3 for name in ("example_batch", "example_seq", "example_past")}
                                   | {"attn_implementation": "sdpa", "ragged_int4": "int8"}})
    assert config.export_config.example_past == 3 and config.export_config.ragged_int4 == "int8"
