"""What launch/policy.launch.py passes to its nodes: only the launch arguments that were given.

Pure Python (no launch, no rclpy) so it is tested where launch_ros is not installed. A launch argument
left empty ('', the default) passes nothing, so the params file's value stands.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# launch argument -> (node parameter, type)
LAUNCH_PARAMETERS: dict[str, tuple[str, type]] = {
    "model": ("model_path", str),
    "rate": ("control_rate_hz", float),
    "autostart": ("autostart", bool),
    "output_mode": ("output_mode", str),
    "arm": ("arm", str),
    "task": ("task", str),
}


def _typed(name: str, text: str, kind: type) -> Any:
    if kind is bool:
        if text.strip().lower() not in ("true", "false"):
            raise ValueError(f"launch argument {name} must be true or false, got {text!r}")
        return text.strip().lower() == "true"
    return kind(text)


def parameter_overrides(args: Mapping[str, str]) -> dict[str, Any]:
    """Typed node parameters for the launch arguments that were given. `use_sim:=true` also sets
    use_sim_time and turns autostart on (a simulated arm needs no operator), unless autostart was given."""
    out = {LAUNCH_PARAMETERS[name][0]: _typed(name, text, LAUNCH_PARAMETERS[name][1])
           for name, text in args.items() if name in LAUNCH_PARAMETERS and text != ""}
    if _typed("use_sim", args.get("use_sim", "") or "false", bool):
        out["use_sim_time"] = True
        out.setdefault("autostart", True)
    return out
