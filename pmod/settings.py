"""The official p-MoD settings (``mod_*`` config keys) and their validation, for any model's config."""

from __future__ import annotations

from pmod.schedule import RetentionSchedule, schedule_from_config
from pmod.weight_norm import parse_weight_norm

MOD_CONFIG_KEYS = (
    "mod_target_layers",
    "mod_target_token_type",
    "mod_router_factor",
    "mod_weight_norm",
    "mod_bias_enabled",
    "mod_special_init",
)


def validate_mod_config(config) -> RetentionSchedule:
    """Parse schedule and weight norm of a p-MoD config; records the p-MoD layer indices in the config."""
    if getattr(config, "mod_target_token_type", None) is None:
        config.mod_target_token_type = "vision_all"
    parse_weight_norm(getattr(config, "mod_weight_norm", None))
    schedule = schedule_from_config(config)
    config.mod_target_layer_indices = list(schedule.mod_layers)
    return schedule
