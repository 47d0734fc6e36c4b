"""One circuit-breaker run: :class:`RunConfig` (the whole run) and :class:`Runner` (the one
orchestrator), defined in :mod:`cbscope.lorra.run` and named here for users::

    from cbscope.run import RunConfig, Runner
    result = Runner(RunConfig(model="organism", preset="organism", out="runs/rr")).run()
"""

from cbscope.lorra.run import (
    PRESET_FILE_OPTIONS,
    RunConfig,
    Runner,
    RunPlan,
    cli_fields,
    field_docs,
    plan_output,
    run_config_from_options,
)

__all__ = [
    "PRESET_FILE_OPTIONS",
    "RunConfig",
    "RunPlan",
    "Runner",
    "cli_fields",
    "field_docs",
    "plan_output",
    "run_config_from_options",
]
