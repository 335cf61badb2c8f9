"""Cameras rendered in processes of their own (`parallel_cameras`): the same frames as rendering them in the env's
process, step after step and under a camera perturbation, and no process left when the env closes."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pybullet")
from sim.env import StackingEnv  # noqa: E402

CAMERAS = ("scene", "wrist")


@pytest.mark.parametrize("perturbation", [{}, {"camera_shift_m": 0.01, "camera_tilt_deg": 1.0, "light_change": 0.2}])
def test_a_camera_in_its_own_process_sees_what_it_would_see_in_the_envs(perturbation):
    here = StackingEnv(image_size=48, cameras=CAMERAS, **perturbation)
    apart = StackingEnv(image_size=48, cameras=CAMERAS, parallel_cameras=True, **perturbation)
    processes = list(apart.camera_processes.values())
    try:
        assert [p.camera for p in processes] == ["wrist"], "the first camera renders in the env's own process"
        rng = np.random.default_rng(0)
        for seed in (3, 4):  # a reset rebuilds the scene: the copy must still match
            frames = [here.reset(seed=seed)[0], apart.reset(seed=seed)[0]]
            for _ in range(15):  # a random reach moves the hand, so the wrist camera's view moves
                action = rng.uniform(here.action_space.low, here.action_space.high) * 0.3
                frames += [here.step(action)[0], apart.step(action)[0]]
            for mine, theirs in zip(frames[::2], frames[1::2], strict=True):
                assert list(mine) == list(theirs), "the same observation keys, in the same order"
                for key in ("camera_scene", "camera_wrist"):
                    np.testing.assert_array_equal(mine[key], theirs[key])
            moved = np.abs(frames[-1]["camera_wrist"].astype(int) - frames[0]["camera_wrist"]).mean()
            assert moved > 1.0, "the wrist view changed over the episode: the copy was posed, not left at rest"
    finally:
        here.close()
        apart.close()
    assert not any(p._process.is_alive() for p in processes), "closing the env ends its camera processes"


def test_an_arm_without_a_wrist_camera_refuses_one_before_starting_a_process():
    import multiprocessing as mp

    from sim.xarm import XArmStackingEnv

    before = set(mp.active_children())
    with pytest.raises(ValueError, match="wrist camera"):
        XArmStackingEnv(image_size=32, cameras=("scene", "wrist"), parallel_cameras=True)
    assert set(mp.active_children()) == before, "no camera process left behind"
