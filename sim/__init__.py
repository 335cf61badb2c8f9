"""PyBullet block stacking for gato_ros: env (`GatoStack-v0`), scripted expert, data collection."""

from gymnasium.envs.registration import register

register(id="GatoStack-v0", entry_point="sim.env:StackingEnv")
register(id="GatoStackXArm6-v0", entry_point="sim.xarm:XArmStackingEnv")
