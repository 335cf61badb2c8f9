"""Where a policy parts from the scripted expert (the generalist's diagnosis in the README, issue 13).

    .venv/bin/python scripts/policy_vs_expert.py runs/gen3/ft1.int8.onnx --task lift_red --condition instruction
    .venv/bin/python scripts/policy_vs_expert.py runs/gen3/ft1 --copy-probe runs/gen3/data/bc-panda-lift_red

Rollout mode: the policy drives (or the expert with --expert-drives) on held-out seeds, and every few steps the
policy's and the expert's commands for the same observation are printed side by side.
--copy-probe DATA (a checkpoint directory instead of a file): teacher-forced action tokens on a few windows of the
data, as recorded and with every earlier action token set to the zero-torque bin; a prediction that moves to the
zero bin is copied from the previous actions.
"""

from __future__ import annotations

import argparse

import numpy as np


def rollout(args: argparse.Namespace) -> None:
    from sim.arms import make_expert
    from sim.evaluate import _init_worker, _worker
    from sim.spec import policy_observation

    _init_worker(args.policy, "cpu", args.max_steps, args.task, args.arm, None, args.condition, None)
    env, policy, conditioning = _worker["env"], _worker["policy"], _worker["conditioning"]
    expert = make_expert(args.arm, args.task)
    for seed in range(args.seed, args.seed + args.episodes):
        obs, info = env.reset(seed=seed)
        policy.reset(**conditioning.reset_arguments(seed))
        done, t = False, 0
        while not done:
            mine, theirs = policy.step(policy_observation(policy.spec, obs)), expert.act(obs)
            if t < 4 or t % 15 == 0:
                print(f"seed {seed} step {t}\n  policy {np.round(mine, 2)}\n  expert {np.round(theirs, 2)}")
            obs, _, terminated, truncated, info = env.step(theirs if args.expert_drives else mine)
            done, t = terminated or truncated, t + 1
        print(f"seed {seed}: success {info['success']} in {t} steps")


def copy_probe(args: argparse.Namespace) -> None:
    import torch

    from gato_ros import tokenizer as tok
    from gato_ros.data import read_dataset
    from gato_ros.sequences import SequenceDataset
    from gato_ros.train import load_checkpoint

    model, config, _ = load_checkpoint(args.policy)
    windows = SequenceDataset(read_dataset(args.copy_probe), 168, episodes=[0, 1, 2], train=False,
                              pinned_span=config.pinned_span,
                              observation_local_positions_only=config.observation_local_positions_only)
    zero_bin = tok.CONTINUOUS_OFFSET + tok.NUM_BINS // 2
    for i in (10, 20, 40):
        item = windows[i]
        ids, targets, with_loss = item["input_ids"], item["targets"], item["loss_mask"]
        is_action_input = torch.zeros_like(with_loss)
        is_action_input[1:] = with_loss[:-1]
        zeroed = ids.clone()
        zeroed[is_action_input & (ids >= tok.CONTINUOUS_OFFSET)] = zero_bin
        scored = with_loss & (targets >= tok.CONTINUOUS_OFFSET)
        with torch.no_grad():
            for name, inputs in (("recorded", ids), ("actions zeroed", zeroed)):
                logits, _ = model(inputs[None], item["position_ids"][None], item["local_positions"][None])
                print(f"window {i} {name:>14}: {logits[0].argmax(-1)[scored][-8:].tolist()}")
        print(f"window {i} {'labels':>14}: {targets[scored][-8:].tolist()}  (zero bin {zero_bin})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("policy", help="an ONNX file (rollout) or a checkpoint directory (--copy-probe)")
    parser.add_argument("--task", default="lift_red")
    parser.add_argument("--arm", default="panda")
    parser.add_argument("--condition", default="none", help="none, prompt, wrong-prompt, instruction")
    parser.add_argument("--seed", type=int, default=100_000)
    parser.add_argument("--episodes", type=int, default=2)
    parser.add_argument("--max-steps", type=int, default=80)
    parser.add_argument("--expert-drives", action="store_true", help="the expert's commands move the arm")
    parser.add_argument("--copy-probe", default=None, help="a dataset directory: run the copy probe instead")
    args = parser.parse_args()
    copy_probe(args) if args.copy_probe else rollout(args)


if __name__ == "__main__":
    main()
