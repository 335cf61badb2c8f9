"""`gato-ros info MODEL [--json]`: what a policy file serves, read from its metadata as the runtime reads it.

Arms (each with its spec), tasks (`gato_ros.contract.read_served`; a file written before issue 13 serves the
Panda and `stack_red_on_blue`), how a task is selected in a file trained with prompts or instructions, the cache
window and trained capacities, the variant and the model's configuration. With `--json`, `arms` and `tasks` are
lists of the names that `--arm` and `--task` accept.
numpy + onnxruntime only, like the runtime.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import onnxruntime as ort

from gato_ros import contract
from gato_ros import tokenizer as tok
from gato_ros.runtime import ModelLoadError, read_model_info
from gato_ros.spec import EmbodimentSpec


def describe(path: str | Path) -> dict:
    """Everything `gato-ros info` prints, as a JSON-ready dict; ModelLoadError for a file that is not a policy."""
    path = str(path)
    if not Path(path).is_file():
        raise ModelLoadError(f"{path}: no such file")
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    try:
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types for a bad file
        raise ModelLoadError(f"{path}: not an ONNX file ONNX Runtime can load ({e})") from e
    info = read_model_info(session, path)  # the runtime's own checks: a file it would refuse is refused here
    try:
        served = contract.read_served(session.get_modelmeta().custom_metadata_map)
    except (ValueError, KeyError, TypeError) as e:
        raise ModelLoadError(f"{path}: unreadable {contract.META_SPECS}/{contract.META_TASKS} ({e})") from e
    specs = {arm: EmbodimentSpec.from_json(json.dumps(raw)) for arm, raw in served.specs.items()}
    return {
        "path": path,
        "arms": list(served.arms),
        "default_arm": served.default_arm,
        "tasks": list(served.tasks),
        "trained_tasks": {arm: list(served.tasks_for(arm)) for arm in served.arms},
        "specs": served.specs,
        "tokens_per_timestep": {arm: tok.timestep_token_count(s) for arm, s in specs.items()},
        "action_modes": {arm: s.action_mode for arm, s in specs.items()},
        "window": info.context_tokens,
        "context_window": info.config.context_window,
        "trained_capacities": sorted({info.config.context_window, *info.trained_capacities}),
        "variant": info.variant,
        "cache_layout": info.cache_layout,
        "config": info.config.to_dict(),
        "conditioning": None if served.conditioning is None else {
            "prompt_steps": served.conditioning.prompt_steps,
            "instructions": served.conditioning.instructions,
        },
    }


def _spec_lines(arm: str, spec: EmbodimentSpec, tokens: int, default: bool, tasks: list[str]) -> list[str]:
    observations = ", ".join(f"{o.name} {tuple(o.shape)} {o.kind}" for o in spec.observations)
    actions = ", ".join(
        f"{a.name} ({'|'.join(f'{v:g}' for v in a.values)})" if a.kind == "discrete" else f"{a.name} (±{a.limit:g})"
        for a in spec.actions
    )
    return [
        f"  arm {arm}{' (default)' if default else ''}: spec {spec.name}, {spec.control_rate_hz:g} Hz, "
        f"{spec.action_mode} actions, {tokens} tokens per timestep",
        f"    trained tasks: {', '.join(tasks)}",
        f"    observations: {observations}",
        f"    actions: {actions}",
    ]


def format_text(d: dict) -> str:
    c = d["config"]
    lines = [
        f"{d['path']}: gato_ros policy, {d['variant']}",
        f"  arms: {', '.join(d['arms'])}",
        f"  tasks: {', '.join(d['tasks'])}",
        f"  window: {d['window']} tokens (trained capacities: {', '.join(map(str, d['trained_capacities']))})",
        f"  model: {c['n_layer']} layers, width {c['n_embd']}, {c['n_head']} heads, feed-forward {c['n_ff']}; "
        f"cache layout {d['cache_layout']}",
    ]
    conditioning = d["conditioning"]
    if conditioning is not None:
        prompt = (f"a demonstration prompt of {conditioning['prompt_steps']} timestep(s)"
                  if conditioning["prompt_steps"] else "no demonstration prompts")
        lines.append(f"  conditioning (pinned for the whole episode): {prompt}; "
                     f"{len(conditioning['instructions'])} instruction(s)")
        lines += [f"    {task}: {text!r}" for task, text in conditioning["instructions"].items()]
    for arm, raw in d["specs"].items():
        spec = EmbodimentSpec.from_json(json.dumps(raw))
        lines += _spec_lines(arm, spec, d["tokens_per_timestep"][arm], arm == d["default_arm"], d["trained_tasks"][arm])
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="PATH.onnx")
    parser.add_argument("--json", action="store_true", help="print JSON (arms and tasks as lists of names)")


def run(args: argparse.Namespace) -> int:
    try:
        d = describe(args.model)
    except ModelLoadError as e:
        print(f"gato-ros info: {e}", file=sys.stderr)
        return 2
    print(json.dumps(d, indent=2) if args.json else format_text(d))
    return 0
