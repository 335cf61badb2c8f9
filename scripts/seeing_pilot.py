"""Pilot tools for the seeing policy: a dataset with fewer observation keys, and a closed-loop check
that also says how close the hand came to the red cube.

    # the same episodes without the wrist camera (without any camera: keep the joints only)
    .venv/bin/python scripts/seeing_pilot.py subset data/sw64 data/s64 \
        --keep joint_positions joint_velocities camera_scene
    # the first shards of a dataset, byte for byte (aux targets kept): a copy that fits a transfer limit
    .venv/bin/python scripts/seeing_pilot.py head runs/see2/expert runs/see2/expert384 --shards 6
    # closed loop, in-process: success and closest approach of the hand to the red cube per seed
    .venv/bin/python scripts/seeing_pilot.py reach runs/pilot/policy.onnx --seeds 100000 --episodes 10
    # the same with every camera frame black: how much of the approach the cameras steer
    .venv/bin/python scripts/seeing_pilot.py reach runs/pilot/policy.onnx --seeds 100000 --episodes 10 --black-frames
    # does the policy read the image? action loss on each episode's first window with its own frames, with
    # another episode's frames (other cube positions), and with black frames
    .venv/bin/python scripts/seeing_pilot.py image-probe runs/see4 runs/see2/expert --first-episode 384 --episodes 61
    # the aux head's error per part of task_state over every timestep, by the hand's distance to the red cube
    .venv/bin/python scripts/seeing_pilot.py aux-error runs/see6/both runs/see6/probe --episodes 20
    # what a file that reaches the cube does there: fingers closed near it, touching it, lifting it
    .venv/bin/python scripts/seeing_pilot.py grasp models/see_int8.onnx --seeds 100000 --episodes 20
    # the same closest-approach summary from `gato-ros eval --json` files
    .venv/bin/python scripts/seeing_pilot.py eval-approach runs/see12/eval-see.json runs/see12/eval-see-robust.json
    # where the hand went in each dataset: share of timesteps far from / near the red cube, the hand's x range
    .venv/bin/python scripts/seeing_pilot.py hand-spread runs/r12/expert runs/r13/dagger3 runs/r13/dagger4
    # how hard the aux term pulls beside the action loss: gradient norms per batch, squared and Huber aux errors
    .venv/bin/python scripts/seeing_pilot.py aux-gradient runs/r13/ft3 runs/r13/dagger3 --huber 0 1 0.3 0.1
    # offline: action loss on the held-out episodes (the split `gato-ros train` made), all windows and
    # the first window of each episode, where only the cube's position says where to go
    .venv/bin/python scripts/seeing_pilot.py offline checkpoints/pilot data/sw64 --val-fraction 0.1

Behaviour cloning of a seeing policy rarely stacks before DAgger (DESIGN.md), so success alone says
little; "reached" (the hand came within 3 cm of the red cube's centre) says whether the policy found
the cube, which only the image can tell it.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np

from gato_ros.data import EpisodeWriter, read_dataset
from sim.results import BLUE_MINUS_RED, REACH_M, RED_MINUS_HAND, RED_YAW, carried, yaw_error_deg


def subset(source: str, out: str, keep: list[str]) -> None:
    """Write the episodes of `source` with only the observation keys in `keep` (same actions, metadata and
    auxiliary targets)."""
    dataset = read_dataset(source)
    missing = set(keep) - {o.name for o in dataset.spec.observations}
    if missing:
        raise SystemExit(f"{source}: no observation key(s) {sorted(missing)}")
    observations = tuple(o for o in dataset.spec.observations if o.name in keep)
    spec = replace(dataset.spec, name=f"{dataset.spec.name}[{','.join(keep)}]", observations=observations)
    with EpisodeWriter(out, spec, aux=dataset.aux) as writer:  # aux targets (training only) kept as they are
        for index, (meta, (obs, actions)) in enumerate(zip(dataset.episodes, dataset, strict=True)):
            free = {k: v for k, v in meta.items() if k not in ("episode", "shard", "start", "length")}
            aux = {key: dataset.aux_values(index, key) for key in dataset.aux}
            writer.add_episode({k: obs[k] for k in keep}, actions, free, aux)
    print(f"subset: {len(dataset)} episodes with {keep} written to {out}")


def head(source: str, out: str, shards: int) -> None:
    """Copy the first `shards` shards of a finished dataset with their episodes' index lines: the shards are
    copied as files, so frames, actions and aux targets are the source's own."""
    src, dst = Path(source), Path(out)
    summary = json.loads((src / "dataset.json").read_text())
    kept_shards = summary["shards"][:shards]
    episodes = [json.loads(line) for line in (src / "episodes.jsonl").read_text().splitlines()]
    kept = [e for e in episodes if e["shard"] in kept_shards]
    dst.mkdir(parents=True)
    for name in [*kept_shards, "spec.json"]:
        shutil.copy2(src / name, dst / name)
    (dst / "episodes.jsonl").write_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in kept))
    summary.update(num_episodes=len(kept), num_steps=sum(int(e["length"]) for e in kept), shards=kept_shards)
    (dst / "dataset.json").write_text(json.dumps(summary, indent=2))
    print(f"head: {len(kept)} episodes ({summary['num_steps']} steps) of {source} written to {out}")


class BlackFrames:
    """A policy whose every camera frame is replaced by a black one: how much of its behaviour the cameras steer."""

    def __init__(self, policy) -> None:  # noqa: ANN001 - a gato_ros.runtime.PolicyRuntime
        self.policy, self.spec = policy, policy.spec

    def reset(self, **kwargs) -> None:  # noqa: ANN003
        self.policy.reset(**kwargs)

    def step(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        return self.policy.step({k: np.zeros_like(v) if k.startswith("camera_") else v for k, v in obs.items()})


class GraspWatch:
    """A policy wrapper that watches each step of the env it acts in: the hand's distance to the red cube, whether
    the policy commands the fingers closed (a negative finger force), whether a finger touches the red cube, how
    high the red cube is and how far it is from above the blue one (horizontally). What a file that reaches the
    cube does there."""

    def __init__(self, policy, env) -> None:  # noqa: ANN001 - a PolicyRuntime, a StackingEnv
        self.policy, self.spec, self.env = policy, policy.spec, env
        self.log: list[tuple[float, bool, bool, float, float]] = []

    def reset(self, **kwargs) -> None:  # noqa: ANN003
        self.log = []
        self.policy.reset(**kwargs)

    def step(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        action = self.policy.step(obs)
        red, blue = self.env.cube_position(0), self.env.cube_position(1)
        distance = 100 * float(np.linalg.norm(red - self.env.hand_position()))
        self.log.append((distance, bool(action[-1] < 0), self.env.fingers_touch(0), 100 * float(red[2]),
                         100 * float(np.linalg.norm(red[:2] - blue[:2]))))
        return action


def grasp(policy_path: str, seeds: list[int]) -> dict:
    """Per episode: closest approach, steps with the fingers commanded closed within REACH_M of the red cube's
    centre and beyond it, the distance at the first close, steps a finger touched the red cube, how far it rose."""
    from sim import evaluate

    evaluate._init_worker(policy_path, "cpu", None)
    watch = evaluate._worker["policy"] = GraspWatch(evaluate._worker["policy"], evaluate._worker["env"])
    rows = []
    try:
        for seed in seeds:
            result = evaluate.run_episode(seed)
            log = np.array(watch.log)
            near = log[:, 0] < 100 * REACH_M
            closed = log[:, 1].astype(bool)
            rows.append({"seed": seed, "success": result.success, "closest_cm": result.closest_to_red_cm,
                         "closed_near": int(np.sum(closed & near)), "closed_far": int(np.sum(closed & ~near)),
                         "first_close_cm": float(log[closed, 0][0]) if closed.any() else None,
                         "touching_steps": int(log[:, 2].sum()), "lift_cm": float(log[:, 3].max() - log[0, 3])})
            lifted = log[:, 3] - log[0, 3] > 2
            # Carried: how close the lifted red cube came to above the blue one; released: opened while it was up.
            rows[-1]["carried_to_blue_cm"] = float(log[lifted, 4].min()) if lifted.any() else None
            rows[-1]["opened_while_lifted"] = bool(np.any(lifted[1:] & ~closed[1:] & closed[:-1]))
            print(json.dumps(rows[-1]))
    finally:
        evaluate.release_worker()
    reached = [r for r in rows if r["closest_cm"] < 100 * REACH_M]
    summary = {"policy": policy_path, "episodes": len(rows), "reached": len(reached),
               "reached_and_closed_near": sum(r["closed_near"] > 0 for r in reached),
               "touched": sum(r["touching_steps"] > 0 for r in rows),
               "lifted_2cm": sum(r["lift_cm"] > 2 for r in rows),
               "carried_within_2cm_of_blue": sum((r["carried_to_blue_cm"] or np.inf) < 2 for r in rows),
               "opened_while_lifted": sum(r["opened_while_lifted"] for r in rows), "per_episode": rows}
    print(f"grasp {policy_path}: reached the red cube in {summary['reached']}/{len(rows)}; of those, closed the "
          f"fingers within {100 * REACH_M:.0f} cm in {summary['reached_and_closed_near']}; a finger touched it in "
          f"{summary['touched']}/{len(rows)}; lifted it 2 cm in {summary['lifted_2cm']}/{len(rows)}, carried it within "
          f"2 cm of above the blue cube in {summary['carried_within_2cm_of_blue']}, opened the fingers with it lifted "
          f"in {summary['opened_while_lifted']}")
    return summary


def approach(successes: list[bool], closest_cm: list[float]) -> dict:
    """Successes, episodes that reached the red cube (< REACH_M), came within 10 cm, and the median closest
    approach."""
    closest = np.asarray(closest_cm)
    return {"episodes": len(closest), "successes": int(sum(successes)), "reached": int(np.sum(closest < 100 * REACH_M)),
            "within_10cm": int(np.sum(closest < 10)), "closest_cm_median": float(np.median(closest))}


def eval_approach(paths: list[str]) -> list[dict]:
    """The same summary from `gato-ros eval --json` files (their per-episode `closest_to_red_cm`)."""
    rows = []
    for path in paths:
        episodes = json.loads(Path(path).read_text())["per_episode"]
        rows.append({"eval": path, **approach([e["success"] for e in episodes],
                                              [e["closest_to_red_cm"] for e in episodes])})
        row = rows[-1]
        print(f"{path}: stacked {row['successes']}/{row['episodes']}, reached the red cube (< {100 * REACH_M:.0f} cm) "
              f"in {row['reached']}, within 10 cm in {row['within_10cm']}, median closest approach "
              f"{row['closest_cm_median']:.1f} cm")
    return rows


def reach(policy_path: str, seeds: list[int], black_frames: bool = False) -> dict:
    from sim import evaluate

    evaluate._init_worker(policy_path, "cpu", None)
    if black_frames:
        evaluate._worker["policy"] = BlackFrames(evaluate._worker["policy"])
    per_episode = []
    try:
        for seed in seeds:
            result = evaluate.run_episode(seed)
            per_episode.append({"seed": seed, "success": result.success, "closest_cm": result.closest_to_red_cm,
                                "reached": result.closest_to_red_cm < 100 * REACH_M, "steps": result.steps})
            print(json.dumps(per_episode[-1]))
    finally:
        evaluate.release_worker()
    summary = {"policy": policy_path, **approach([e["success"] for e in per_episode],
                                                 [e["closest_cm"] for e in per_episode]), "per_episode": per_episode}
    print(f"reach {policy_path}: reached the red cube (< {100 * REACH_M:.0f} cm) in {summary['reached']}/{len(seeds)}, "
          f"stacked {summary['successes']}/{len(seeds)}, median closest approach {summary['closest_cm_median']:.1f} cm")
    return summary


def offline(checkpoint: str, data: str, val_fraction: float, seed: int) -> dict:
    import torch

    from gato_ros import tokenizer as tok
    from gato_ros.sequences import SequenceDataset
    from gato_ros.train import load_checkpoint, split_episodes

    torch.set_num_threads(1)
    model, config, spec = load_checkpoint(checkpoint)
    dataset = read_dataset(data, spec)
    _, held_out = split_episodes(len(dataset), val_fraction, seed)
    windows = SequenceDataset(dataset, config.context_window, held_out, train=False, seed=seed,
                              observation_local_positions_only=config.observation_local_positions_only)
    step_tokens = tok.timestep_token_count(spec)
    result = {}
    with torch.no_grad():
        for name, items in (("all windows", range(len(windows))),
                            ("first window", [i for i, (_, s) in enumerate(windows.index) if s == 0])):
            total = count = 0.0
            for i in items:
                batch = {k: v[None] for k, v in windows[i].items()}
                n = int(batch["loss_mask"].sum())
                total += float(model.action_loss(**batch)) * n
                count += n
            result[name] = total / max(count, 1)
    print(f"offline {checkpoint} on {len(held_out)} held-out episodes of {data} ({config.context_window} tokens = "
          f"{config.context_window // step_tokens} timesteps per window): action loss, all windows "
          f"{result['all windows']:.3f}, first window {result['first window']:.3f}")
    return result


AUX_PARTS = {"hand": slice(0, 3), "red cube": slice(3, 6), "blue cube": slice(6, 9), "red - hand": RED_MINUS_HAND,
             "blue - red": BLUE_MINUS_RED}
DISTANCE_BINS_M = (0.0, 0.05, 0.10, 0.20, np.inf)


def aux_estimates(model, items, aux) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001 - a GatoModel, an AuxSpec
    """The aux head's task_state estimate and the truth (both in env units: the aux spec's normalization undone) at
    every aux-masked timestep of the window items (SequenceDataset items with aux targets)."""
    import torch

    scale, offset = np.asarray(aux.scale), np.asarray(aux.offset)
    estimate, truth = [], []
    with torch.no_grad():
        for item in items:
            hidden, _ = model.hidden(*(item[k][None] for k in ("input_ids", "position_ids", "local_positions")),
                                     patches=item["patches"][None], patch_positions=item["patch_positions"][None])
            mask = item["aux_mask"][None]
            estimate.append(model.aux_head(hidden[mask]).numpy() * scale + offset)
            truth.append(item["aux_targets"][None][mask].numpy() * scale + offset)
    return np.concatenate(estimate), np.concatenate(truth)


def image_probe(checkpoint: str, data: str, episodes: int, first_episode: int = 0) -> dict:
    """Each episode's first window (where only the image says where the cubes are) scored three ways: its own
    frames, the frames of the next episode's first window (same token layout, other cube positions), and black
    frames. A policy that reads the image loses clearly more with the wrong frames than with its own."""
    import torch

    from gato_ros.sequences import SequenceDataset
    from gato_ros.train import load_checkpoint

    torch.set_num_threads(1)
    model, config, spec = load_checkpoint(checkpoint)
    dataset = read_dataset(data)
    if replace(dataset.spec, name=spec.name) != spec:  # a `subset` copy names the same layout differently
        raise SystemExit(f"{data}: spec {dataset.spec.name!r} has other keys than the checkpoint's {spec.name!r}")
    chosen = list(range(first_episode, min(first_episode + episodes, len(dataset))))
    aux_key = "task_state" if model.aux_head is not None and "task_state" in dataset.aux else None
    windows = SequenceDataset(dataset, config.context_window, chosen, train=False, seed=0,
                              observation_local_positions_only=config.observation_local_positions_only,
                              aux_key=aux_key)
    first = [windows[i] for i, (_, start) in enumerate(windows.index) if start == 0]
    keys = ("input_ids", "position_ids", "local_positions", "targets", "loss_mask", "target_hi", "patches",
            "patch_positions")
    losses: dict[str, list[float]] = {"own frames": [], "another episode's frames": [], "black frames": []}
    with torch.no_grad():
        for i, item in enumerate(first):
            other = first[(i + 1) % len(first)]
            batch = {k: item[k][None] for k in keys}
            losses["own frames"].append(float(model.action_loss(**batch)))
            losses["another episode's frames"].append(float(model.action_loss(**{**batch,
                                                                                 "patches": other["patches"][None]})))
            losses["black frames"].append(float(model.action_loss(**{**batch,
                                                                     "patches": torch.zeros_like(batch["patches"])})))
    result = {name: float(np.mean(v)) for name, v in losses.items()}
    if aux_key:  # the training-only head's estimate of the red cube's position (task_state[3:6]) from the frames
        estimate, target = aux_estimates(model, first, dataset.aux[aux_key])
        red = AUX_PARTS["red cube"]
        errors = np.linalg.norm(estimate[:, red] - target[:, red], axis=1)
        baseline = np.linalg.norm(target[:, red] - target[:, red].mean(axis=0), axis=1)
        result["red_cube_cm"] = 100 * float(np.median(errors))
        result["red_cube_cm_guessing_the_mean"] = 100 * float(np.median(baseline))
    worse = float(np.mean(np.array(losses["another episode's frames"]) > np.array(losses["own frames"])))
    print(f"image-probe {checkpoint} on the first windows of {len(first)} episodes of {data}: action loss "
          + ", ".join(f"{k} {result[k]:.3f}" for k in losses)
          + f"; another episode's frames score worse than its own in {100 * worse:.0f} % of windows"
          + (f"; aux head's red cube position error median {result['red_cube_cm']:.1f} cm (guessing the mean: "
             f"{result['red_cube_cm_guessing_the_mean']:.1f} cm)" if aux_key else ""))
    return {**result, "worse_share": worse, "windows": len(first)}


def hand_spread(roots: list[str]) -> list[dict]:
    """Where the hand went in each dataset (from its stored task_state aux targets): the share of timesteps with
    the hand more than 20 cm from the red cube's centre and within 5 cm of it, and the range of the hand's x.
    A DAgger round whose policy flings the arm away shows a large far share and an x range the demonstrations
    never reach."""
    rows = []
    for root in roots:
        dataset = read_dataset(root)
        state = np.concatenate([dataset.aux_values(i, "task_state") for i in range(len(dataset))])
        distance = np.linalg.norm(state[:, AUX_PARTS["red - hand"]], axis=1)
        hand_x = state[:, AUX_PARTS["hand"]][:, 0]
        rows.append({"data": root, "timesteps": len(state), "far_share": float(np.mean(distance > 0.20)),
                     "near_share": float(np.mean(distance < 0.05)),
                     "hand_x_m": [float(hand_x.min()), float(hand_x.max())]})
        row = rows[-1]
        print(f"hand-spread {root}: {row['timesteps']} timesteps, hand > 20 cm from the red cube in "
              f"{100 * row['far_share']:.0f} %, within 5 cm in {100 * row['near_share']:.0f} %, hand x "
              f"{row['hand_x_m'][0]:.2f} to {row['hand_x_m'][1]:.2f} m")
    return rows


def with_aux_head(checkpoint: str, data: str):  # noqa: ANN201 - (GatoModel, GatoConfig, EpisodeDataset)
    """The checkpoint's model and config, and the dataset, refusing a model without an aux head or data of another
    layout or without task_state aux targets."""
    from gato_ros.train import load_checkpoint

    model, config, spec = load_checkpoint(checkpoint)
    if model.aux_head is None:
        raise SystemExit(f"{checkpoint}: no aux head (trained without --aux-key)")
    dataset = read_dataset(data)
    if replace(dataset.spec, name=spec.name) != spec or "task_state" not in dataset.aux:
        raise SystemExit(f"{data}: not the checkpoint's layout, or no task_state aux targets")
    return model, config, dataset


def aux_error(checkpoint: str, data: str, episodes: int, first_episode: int = 0) -> dict:
    """The training-only aux head's estimate of task_state at every timestep of the episodes (each window's own
    timesteps), against the truth: median error (cm) per part, overall and by the hand's distance to the red cube.
    The hand's position follows from the joints alone, so its error is the head's own floor."""
    import torch

    from gato_ros.sequences import SequenceDataset

    torch.set_num_threads(1)
    model, config, dataset = with_aux_head(checkpoint, data)
    chosen = list(range(first_episode, min(first_episode + episodes, len(dataset))))
    windows = SequenceDataset(dataset, config.context_window, chosen, train=False, seed=0,
                              observation_local_positions_only=config.observation_local_positions_only,
                              aux_key="task_state")
    estimate, target = aux_estimates(model, (windows[i] for i in range(len(windows))), dataset.aux["task_state"])
    distance = np.linalg.norm(target[:, AUX_PARTS["red - hand"]], axis=1)
    bins = list(zip(DISTANCE_BINS_M[:-1], DISTANCE_BINS_M[1:], strict=True))
    in_bin = [(distance >= lo) & (distance < hi) for lo, hi in bins]
    result: dict = {"timesteps": len(target), "parts": {}}
    errors = {name: 100 * np.linalg.norm(estimate[:, part] - target[:, part], axis=1)
              for name, part in AUX_PARTS.items()}
    errors["red yaw (deg)"] = yaw_error_deg(estimate[:, RED_YAW], target[:, RED_YAW])
    for name, error_cm in errors.items():
        by_distance = [float(np.median(error_cm[mask])) if mask.any() else None for mask in in_bin]
        result["parts"][name] = {"median_cm": float(np.median(error_cm)), "by_distance_cm": by_distance}
    lifted = carried(target)
    result["blue_minus_red_lifted_cm"] = float(np.median(errors["blue - red"][lifted])) if lifted.any() else None
    labels = [f"{100 * lo:.0f}-{100 * hi:.0f} cm" if np.isfinite(hi) else f"> {100 * lo:.0f} cm" for lo, hi in bins]
    counts = [int(mask.sum()) for mask in in_bin]
    result["distance_bins"], result["bin_timesteps"] = labels, counts
    print(f"aux-error {checkpoint} on {len(target)} timesteps (windows overlap) of {len(chosen)} episodes of {data}: "
          "median error in cm (yaw in degrees), all timesteps, then by hand-red distance " + ", ".join(
              f"{label} (n={n})" for label, n in zip(labels, counts, strict=True)))
    for name, row in result["parts"].items():
        cells = " ".join("  -  " if v is None else f"{v:5.2f}" for v in row["by_distance_cm"])
        print(f"  {name:13s} {row['median_cm']:5.2f} | {cells}")
    print(f"  blue - red with the red cube carried (n={int(lifted.sum())}): {result['blue_minus_red_lifted_cm']} cm")
    return result


def aux_gradient(checkpoint: str, data: str, batches: int, batch_size: int, weight: float,
                 deltas: list[float]) -> dict:
    """Gradient norm of the action loss and of `weight` times the aux term (squared error for delta 0, else
    linear beyond delta: the model's `aux_huber`) over the checkpoint's parameters, on random training-length
    windows (twice the context, as the seeing recipe trains) of `data`. With gradient clipping, a term whose
    norm is many times the other's decides the step: on the states a DAgger round visits, the aux term's."""
    import torch

    from gato_ros.sequences import SequenceDataset

    torch.set_num_threads(2)
    torch.manual_seed(0)
    model, config, dataset = with_aux_head(checkpoint, data)
    windows = SequenceDataset(dataset, 2 * config.context_window, stride_steps=2, train=True, seed=0,
                              observation_local_positions_only=config.observation_local_positions_only,
                              aux_key="task_state")
    order = np.random.default_rng(0).permutation(len(windows))
    parameters = [p for p in model.parameters() if p.requires_grad]

    def norm(loss: torch.Tensor) -> float:
        grads = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
        return float(torch.sqrt(sum((g ** 2).sum() for g in grads if g is not None)))

    model.train()
    rows = []
    for b in range(batches):
        items = [windows[int(i)] for i in order[b * batch_size:(b + 1) * batch_size]]
        batch = torch.utils.data.default_collate(items)
        targets, mask = batch.pop("aux_targets"), batch.pop("aux_mask")
        hidden, _ = model.hidden(batch["input_ids"], batch["position_ids"], batch["local_positions"],
                                 patches=batch["patches"], patch_positions=batch["patch_positions"])
        action = model._action_loss(hidden, batch["targets"], batch["loss_mask"], batch["target_hi"])
        row = {"action_loss": float(action.detach()), "action_grad": norm(action), "aux_grad": {}}
        for delta in deltas:
            model.config = replace(config, aux_huber=delta)
            row["aux_grad"][str(delta)] = norm(weight * model.aux_error(hidden, targets, mask))
        rows.append(row)
        print(f"batch {b}: action loss {row['action_loss']:.2f}, gradient norm {row['action_grad']:.2f}; "
              f"{weight:g} x aux error, gradient norm " + ", ".join(
                  f"{'squared' if d == 0 else f'huber {d:g}'} {row['aux_grad'][str(d)]:.2f}" for d in deltas))
    model.config = config
    return {"checkpoint": checkpoint, "data": data, "weight": weight, "batches": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_subset = sub.add_parser("subset", help="a dataset with fewer observation keys")
    p_subset.add_argument("source")
    p_subset.add_argument("out")
    p_subset.add_argument("--keep", nargs="+", required=True, help="observation keys to keep")
    p_head = sub.add_parser("head", help="the first shards of a dataset, copied as they are")
    p_head.add_argument("source")
    p_head.add_argument("out")
    p_head.add_argument("--shards", type=int, required=True)
    p_reach = sub.add_parser("reach", help="closed-loop success and closest approach to the red cube")
    p_reach.add_argument("policy", help="PATH.onnx")
    p_reach.add_argument("--seeds", type=int, default=100_000, help="first seed (held out from training)")
    p_reach.add_argument("--episodes", type=int, default=10)
    p_reach.add_argument("--json", type=Path, default=None)
    p_reach.add_argument("--black-frames", action="store_true", help="every camera frame black: what the cameras steer")
    p_grasp = sub.add_parser("grasp", help="where the policy closes the fingers, touches and lifts the red cube")
    p_grasp.add_argument("policy", help="PATH.onnx")
    p_grasp.add_argument("--seeds", type=int, default=100_000, help="first seed (held out from training)")
    p_grasp.add_argument("--episodes", type=int, default=10)
    p_grasp.add_argument("--json", type=Path, default=None)
    p_probe = sub.add_parser("image-probe", help="first-window action loss with own, another episode's, black frames")
    p_probe.add_argument("checkpoint")
    p_probe.add_argument("data")
    p_probe.add_argument("--episodes", type=int, default=60)
    p_probe.add_argument("--first-episode", type=int, default=0, help="skip the episodes a policy trained on")
    p_aux = sub.add_parser("aux-error", help="the aux head's task_state error per part, by hand-red distance")
    p_aux.add_argument("checkpoint")
    p_aux.add_argument("data")
    p_aux.add_argument("--episodes", type=int, default=20)
    p_aux.add_argument("--first-episode", type=int, default=0, help="skip the episodes a policy trained on")
    p_approach = sub.add_parser("eval-approach", help="reached, within 10 cm, median closest approach of eval JSONs")
    p_approach.add_argument("evals", nargs="+", help="gato-ros eval --json files")
    p_spread = sub.add_parser("hand-spread", help="share of timesteps far from and near the red cube, hand x range")
    p_spread.add_argument("data", nargs="+")
    p_grad = sub.add_parser("aux-gradient", help="gradient norms of the action loss and the aux term, per batch")
    p_grad.add_argument("checkpoint")
    p_grad.add_argument("data")
    p_grad.add_argument("--batches", type=int, default=4)
    p_grad.add_argument("--batch-size", type=int, default=32)
    p_grad.add_argument("--weight", type=float, default=5.0, help="the aux weight to measure at")
    p_grad.add_argument("--huber", type=float, nargs="+", default=[0.0, 0.1], help="deltas (0: squared error)")
    p_grad.add_argument("--json", type=Path, default=None)
    p_offline = sub.add_parser("offline", help="held-out action loss, all windows and each episode's first")
    p_offline.add_argument("checkpoint")
    p_offline.add_argument("data")
    p_offline.add_argument("--val-fraction", type=float, default=0.05, help="as given to gato-ros train")
    p_offline.add_argument("--seed", type=int, default=0, help="as given to gato-ros train")
    args = parser.parse_args()
    if args.command == "subset":
        subset(args.source, args.out, args.keep)
    elif args.command == "head":
        head(args.source, args.out, args.shards)
    elif args.command == "image-probe":
        image_probe(args.checkpoint, args.data, args.episodes, args.first_episode)
    elif args.command == "aux-error":
        aux_error(args.checkpoint, args.data, args.episodes, args.first_episode)
    elif args.command == "eval-approach":
        eval_approach(args.evals)
    elif args.command == "hand-spread":
        hand_spread(args.data)
    elif args.command == "aux-gradient":
        result = aux_gradient(args.checkpoint, args.data, args.batches, args.batch_size, args.weight, args.huber)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    elif args.command == "offline":
        offline(args.checkpoint, args.data, args.val_fraction, args.seed)
    elif args.command == "grasp":
        result = grasp(args.policy, [args.seeds + i for i in range(args.episodes)])
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    else:
        summary = reach(args.policy, [args.seeds + i for i in range(args.episodes)], args.black_frames)
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
