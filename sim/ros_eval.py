"""`gato-ros eval --over-ros`: the sim bridge and the policy node as separate processes over ROS 2.

The policy sees exactly what a real arm gives it: `sim_bridge` publishes /joint_states and the
observation topics and takes the arm's controller topic (/effort_controller/commands for the Panda,
/velocity_controller/commands for the xArm6); `policy_node` (the lifecycle node that runs on a robot)
ticks at the control rate on sim time (`use_sim_time`, /clock from the bridge), and `policy_watchdog`
relays its stamped commands to the controller topics, as on a robot.

`arm` picks the body: the bridge simulates it (`arm`, and `task` for what counts as success), the node
serves the file's spec for it (`arm`) in the output mode its actions are (the spec's action mode), and the
watchdog relays that mode with the spec's gripper joint (`arm_parameters`). A file that does not serve the
arm is refused by the node and the bridge, naming the arms it does.
An in-process rclpy supervisor runs the episodes:

    for each seed: set the bridge's seed → reset the node's context (~/reset) → reset the bridge
    (~/reset) → poll the bridge's ~/status until the episode is done

A seeing policy works the same way: the bridge builds its env from the model's spec (`model_path`), so it
renders the model's cameras and publishes each as `<camera>/image_raw`, and the node maps each image key to
its camera's topic. Camera perturbations (`perturbation`: camera_shift_m, camera_tilt_deg, light_change) go
to the bridge's env as in-process evaluation gives them to its env.

The bridge publishes an observation before /clock and waits a full period after a reset, so the
node's tick for step t answers observation t before the bridge steps to t + 1, as in-process
stepping does; the bridge counts the steps where that failed (stale commands) and measures the
wall-clock latency from publishing an observation to receiving its command. Between episodes the
bridge is paused (`pause_when_done`), so /clock stops and the node does not tick on an old scene.

DDS stays on loopback (ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST unless the caller chose another) in
a random domain unless ROS_DOMAIN_ID is set. Every process gets SIGINT, then SIGKILL, whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sim.results import EpisodeResult

BRIDGE, NODE = "sim_bridge", "gato_policy"


@dataclass
class RosEpisodeResult(EpisodeResult):
    """An episode over ROS. `step_ms` holds, per step, observation published → command received (wall)."""

    commands: int = 0  # commands the bridge received during the episode
    control_rate_hz: float = 0.0  # commands per sim second (the policy's rate on the sim clock)
    wall_rate_hz: float = 0.0  # sim steps per wall second (the bridge's real-time rate)
    fresh_steps: int = 0  # steps whose command answered the latest observation
    stale_steps: int = 0  # steps that ran on an older command (or the hold command)
    stale_at: list[int] = field(default_factory=list)  # which steps (0 = the first)
    rejected_commands: int = 0  # wrong length, NaN or inf (the node must never send one)


def ros_environment() -> tuple[str, str]:
    """Loopback DDS unless the caller chose otherwise; a random domain unless one is set. Sets os.environ."""
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    if not os.environ.get("ROS_DOMAIN_ID"):
        os.environ["ROS_DOMAIN_ID"] = str(random.SystemRandom().randint(1, 100))
    return os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"], os.environ["ROS_DOMAIN_ID"]


PERTURBATION_OPTIONS = ("camera_shift_m", "camera_tilt_deg", "light_change")  # StackingConfig fields = bridge params


def model_image_size(policy_path: str) -> int:
    """The camera size the model wants (0: no image observation), from the spec in the ONNX metadata."""
    from sim.spec import model_spec

    return next((int(o.shape[0]) for o in model_spec(policy_path).observations if o.kind == "image"), 0)


def _console_script(name: str, module: str) -> list[str]:
    """The venv's console script beside this interpreter, else the module through this interpreter."""
    script = Path(sys.executable).parent / name
    return [str(script)] if script.exists() else [sys.executable, "-m", module]


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGKILL when the supervisor dies, even by SIGKILL, so no orphan stays."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


class Processes:
    """Child processes with their logs; `stop()` ends every one (SIGINT, then SIGKILL) and reaps it."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str]) -> None:
        log = open(self.log_dir / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
        # Own session: a Ctrl-C in the terminal reaches the supervisor only, which stops the children in order.
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ),
                                            start_new_session=True,
                                            preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        log.close()

    def log_tail(self, name: str, chars: int = 2000) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace")[-chars:] if path.exists() else ""

    def check(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail(name)}")

    def stop(self, timeout_s: float = 5.0, poke: Any = None) -> dict[str, int]:
        """SIGINT (the node publishes its safe command and exits), then SIGTERM (a child started from a shell
        that ignores SIGINT inherits that; both nodes end cleanly on SIGTERM too), then SIGKILL. Exit codes.

        `poke()` is called while waiting: the policy node handles a signal only when its executor wakes, and
        with the sim paused its sim-time timers never fire, so a service call wakes it."""
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
            running = [proc for proc in self.procs.values() if proc.poll() is None]
            for proc in running:
                proc.send_signal(sig)
            end = time.monotonic() + timeout_s
            while any(proc.poll() is None for proc in running) and time.monotonic() < end:
                if poke is not None and sig != signal.SIGKILL:
                    with contextlib.suppress(Exception):  # best effort: the node may be gone already
                        poke()
                time.sleep(0.1)
        return {name: proc.wait() for name, proc in self.procs.items()}


class Supervisor:
    """An rclpy node in this process: service calls, the bridge's episode record, the node's diagnostics."""

    def __init__(self) -> None:
        import rclpy
        from diagnostic_msgs.msg import DiagnosticArray
        from lifecycle_msgs.srv import GetState
        from rcl_interfaces.srv import SetParameters
        from rclpy.executors import SingleThreadedExecutor
        from std_srvs.srv import Trigger

        self.context = rclpy.Context()
        rclpy.init(context=self.context)
        self.node = rclpy.create_node(f"gato_eval_supervisor_{os.getpid()}", context=self.context)
        self.diagnostics: dict[str, str] = {}
        self.watchdog_diagnostics: dict[str, str] = {}
        self.pokes: list[Any] = []  # unanswered wake-up calls to the node (it may exit before answering)
        self.node.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, 10)
        client = self.node.create_client
        self.bridge_reset = client(Trigger, f"/{BRIDGE}/reset")
        self.bridge_status = client(Trigger, f"/{BRIDGE}/status")
        self.bridge_pause = client(Trigger, f"/{BRIDGE}/pause")
        self.bridge_trajectory = client(Trigger, f"/{BRIDGE}/trajectory")
        self.bridge_frames = client(Trigger, f"/{BRIDGE}/frames")
        self.bridge_params = client(SetParameters, f"/{BRIDGE}/set_parameters")
        self.node_reset = client(Trigger, f"/{NODE}/reset")
        self.node_state = client(GetState, f"/{NODE}/get_state")
        self.executor = SingleThreadedExecutor(context=self.context)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def _on_diagnostics(self, msg: Any) -> None:
        for status in msg.status:
            if NODE in status.name:
                self.diagnostics = {kv.key: kv.value for kv in status.values}
            elif status.name.endswith(": watchdog"):
                self.watchdog_diagnostics = {kv.key: kv.value for kv in status.values}

    def recording(self, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Joint positions (steps + 1, the arm's joints and finger) and task states (steps + 1, 17) of episode
        `seed`, as the bridge recorded them (the topics are best-effort: a subscriber here could miss a message)."""
        record = json.loads(self.trigger(self.bridge_trajectory).message)
        episode = next((e for e in (record["current"], record["previous"]) if e and e["seed"] == seed), None)
        if episode is None:
            raise RuntimeError(f"the bridge holds no record of episode seed {seed}")
        observations = episode["observations"]
        return np.array(observations["joint_positions"]), np.array(observations["task_state"])

    def frames(self, seed: int) -> dict[str, np.ndarray]:
        """The camera frames of episode `seed` as the bridge rendered them, per image key: (steps + 1, H, W, 3)."""
        from sim.cameras import frames_from_text

        record = json.loads(self.trigger(self.bridge_frames).message)
        episode = next((e for e in (record["current"], record["previous"]) if e and e["seed"] == seed), None)
        if episode is None:
            raise RuntimeError(f"the bridge holds no frames of episode seed {seed}")
        return {key: frames_from_text(text) for key, text in episode["frames"].items()}

    def call(self, client: Any, request: Any, timeout_s: float = 10.0) -> Any:
        if not client.wait_for_service(timeout_sec=timeout_s):
            raise TimeoutError(f"service {client.srv_name} is not available")
        done = threading.Event()
        future = client.call_async(request)
        future.add_done_callback(lambda _: done.set())
        if not done.wait(timeout_s):
            client.remove_pending_request(future)
            raise TimeoutError(f"service {client.srv_name} did not answer in {timeout_s} s")
        return future.result()

    def trigger(self, client: Any) -> Any:
        from std_srvs.srv import Trigger

        return self.call(client, Trigger.Request())

    def status(self) -> dict:
        return json.loads(self.trigger(self.bridge_status).message)

    def set_seed(self, seed: int) -> None:
        from rcl_interfaces.srv import SetParameters
        from rclpy.parameter import Parameter

        request = SetParameters.Request(parameters=[Parameter("seed", value=int(seed)).to_parameter_msg()])
        result = self.call(self.bridge_params, request).results[0]
        if not result.successful:
            raise RuntimeError(f"cannot set the bridge's seed: {result.reason}")

    def node_active(self) -> bool:
        from lifecycle_msgs.msg import State
        from lifecycle_msgs.srv import GetState

        try:
            return self.call(self.node_state, GetState.Request(), 2.0).current_state.id == State.PRIMARY_STATE_ACTIVE
        except TimeoutError:
            return False

    def poke_node(self) -> None:
        """A request the node answers from its executor (wakes it); the answer is not awaited."""
        from lifecycle_msgs.srv import GetState

        if self.node_state.service_is_ready():
            self.pokes.append(self.node_state.call_async(GetState.Request()))

    def close(self) -> None:
        import rclpy

        for future in self.pokes:
            if not future.done():
                self.node_state.remove_pending_request(future)
                future.cancel()
        self.executor.shutdown()
        self.node.destroy_node()
        rclpy.try_shutdown(context=self.context)
        self.thread.join(timeout=5)


def _wait(predicate: Any, timeout_s: float, what: str, procs: Processes, poll_s: float = 0.05) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        procs.check()
        if predicate():
            return
        time.sleep(poll_s)
    logs = f"--- {BRIDGE} log ---\n{procs.log_tail('bridge')}\n--- {NODE} log ---\n{procs.log_tail('node')}"
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{logs}")


def _start_recorder(procs: Processes, bag: Path, node: Any) -> None:
    """`gato-ros record` beside the bridge and the node; returns once it subscribes the node's tick records
    and the bridge's episode events (it subscribes every topic it records in the same discovery pass)."""
    from gato_ros.record import EPISODE_TOPIC, TICK_TOPIC

    procs.start("recorder", _console_script("gato-ros", "gato_ros.cli") + ["record", "--out", str(bag)])
    _wait(lambda: node.count_subscribers(TICK_TOPIC) >= 1 and node.count_subscribers(EPISODE_TOPIC) >= 1, 30.0,
          "the recorder to subscribe", procs)


def _result(status: dict, period: float) -> RosEpisodeResult:
    steps, commands = int(status["steps"]), int(status["commands"])
    return RosEpisodeResult(
        seed=int(status["seed"]), success=bool(status["success"]), steps=steps, nan=bool(status["nan"]),
        step_ms=[float(x) for x in status.get("latency_ms", [])], commands=commands,
        # An episode has steps + 1 observations (the reset's and one per step), each worth one tick.
        control_rate_hz=commands / ((steps + 1) * period),
        wall_rate_hz=steps / status["wall_s"] if status.get("wall_s") else 0.0,
        fresh_steps=int(status["fresh_steps"]), stale_steps=int(status["stale_steps"]),
        stale_at=[int(s) for s in status.get("stale_at", [])],
        rejected_commands=int(status["rejected"]), closest_to_red_cm=float(status["closest_to_red_cm"]),
    )


@dataclass
class RosRun:
    """What one over-ROS evaluation returns: the episodes and how the two processes ended."""

    results: list[RosEpisodeResult]
    exit_codes: dict[str, int]  # per process; 0 = it ended on SIGINT by itself
    node_diagnostics: dict[str, str]  # the policy node's last diagnostics values
    watchdog_diagnostics: dict[str, str]  # the watchdog's last diagnostics values (published once a second)
    domain_id: str
    pids: dict[str, int]
    recording: tuple[int, np.ndarray, np.ndarray] | None  # (seed, joint positions, task states) of the first episode
    frames: dict[str, np.ndarray] = field(default_factory=dict)  # the first episode's camera frames, per image key


def evaluate_over_ros(
    policy_path: str,
    seeds: list[int],
    provider: str = "auto",
    max_steps: int | None = None,
    video: Path | str | None = None,
    real_time_factor: float = 1.0,
    gif: Path | str | None = None,
    log_dir: Path | str | None = None,
    progress: bool = True,
    record: Path | str | None = None,
    watchdog: bool = True,
    perturbation: dict[str, float] | None = None,
    arm: str | None = None,
    task: str | None = None,
    parallel_cameras: bool = True,
) -> RosRun:
    """Run one episode per seed through `sim_bridge` + `policy_node` (+ `policy_watchdog` relaying its commands,
    as on a robot; `watchdog=False`: the node publishes to the controller itself); film the first one (`video`,
    `gif`: for a seeing policy, what it saw beside the scene); with `record` a `gato-ros record` process beside
    them writes the run into that bag directory. `perturbation` ({camera_shift_m, camera_tilt_deg, light_change})
    perturbs the bridge's cameras per episode, as `StackingEnv` does in-process. `arm` (default the Panda) is the
    simulated arm and the one the node serves; `task` (default the stacking task) what counts as success;
    `parallel_cameras` False renders every camera in the bridge's own process, one after another."""
    if policy_path == "expert":
        raise ValueError("--over-ros runs the policy node, which serves an ONNX model: pass --policy PATH.onnx")
    from sim.env import DEFAULT_ARM, StackingConfig
    from sim.tasks import DEFAULT_TASK

    ros_environment()
    arm, task = arm or DEFAULT_ARM, task or DEFAULT_TASK
    policy_path = str(Path(policy_path).resolve())
    max_steps = int(max_steps or StackingConfig().max_steps)
    period = 1.0 / StackingConfig().control_hz
    tmp = tempfile.TemporaryDirectory(prefix="gato-ros-eval-") if log_dir is None else None
    logs = Path(log_dir if log_dir is not None else tmp.name)
    logs.mkdir(parents=True, exist_ok=True)
    procs = Processes(logs)
    supervisor = None
    diagnostics: dict[str, str] = {}
    watchdog_diagnostics: dict[str, str] = {}
    results: list[RosEpisodeResult] = []
    recorded = None
    frames: dict[str, np.ndarray] = {}
    try:
        served = start_processes(procs, policy_path, provider, seeds[0] if seeds else 0, max_steps,
                                 real_time_factor, watchdog, perturbation, arm, task, parallel_cameras)
        supervisor = Supervisor()
        wait_until_connected(supervisor, procs, served, None if record is None else Path(record))
        episode_timeout = 30.0 + 3.0 * (max_steps + 2) * period / max(real_time_factor, 0.05)
        from tqdm import tqdm

        for i, seed in enumerate(tqdm(seeds, desc="eval over ROS", disable=not progress)):
            results.append(run_episode(supervisor, procs, seed, period, episode_timeout, real_time_factor))
            if i == 0:
                recorded = (seed, *supervisor.recording(seed))
                frames = supervisor.frames(seed)
    finally:
        codes = procs.stop(poke=supervisor.poke_node if supervisor is not None else None)
        if supervisor is not None:
            diagnostics = dict(supervisor.diagnostics)
            watchdog_diagnostics = dict(supervisor.watchdog_diagnostics)
            supervisor.close()
        if tmp is not None:
            tmp.cleanup()
    if recorded is not None and (video or gif):
        from sim.replay import replay_to_files

        # A seeing policy's film shows its cameras' frames (upscaled) beside the scene.
        replay_to_files(*recorded, video=video, gif=gif, fps=1.0 / period, policy_frames=list(frames.values()),
                        arm=arm, task=task)
    return RosRun(results=results, exit_codes=codes, node_diagnostics=diagnostics,
                  watchdog_diagnostics=watchdog_diagnostics,
                  domain_id=os.environ["ROS_DOMAIN_ID"], pids={name: proc.pid for name, proc in procs.procs.items()},
                  recording=recorded, frames=frames)


@dataclass(frozen=True)
class ArmParameters:
    """What the node and the watchdog are told for the arm a file serves (`name:=value` each), and the arm
    controller topic their commands reach."""

    node: list[str]
    watchdog: list[str]
    command_topic: str
    gripper: bool  # the file commands a gripper


def arm_parameters(policy_path: str, arm: str) -> ArmParameters:
    """From the file's spec for `arm`: the output mode its actions are (the first controller mode that takes
    them), and the gripper joint the watchdog finds in the node's commands (the layout the node builds)."""
    from gato_ros.commands import ARM_COMMAND_TOPICS, default_output_mode
    from gato_ros.control import build_layout
    from sim.spec import model_spec

    spec = model_spec(policy_path, arm)
    mode = default_output_mode(spec)
    gripper = build_layout(spec).gripper_name or ""
    node = [f"arm:={arm}", f"output_mode:={mode}"]
    return ArmParameters(node=node, watchdog=[f"output_mode:={mode}", f"gripper_joint:={gripper}"],
                         command_topic="/" + ARM_COMMAND_TOPICS[mode], gripper=bool(gripper))


def start_processes(procs: Processes, policy_path: str, provider: str, first_seed: int, max_steps: int,
                    real_time_factor: float, watchdog: bool = True,
                    perturbation: dict[str, float] | None = None, arm: str | None = None,
                    task: str | None = None, parallel_cameras: bool = True) -> ArmParameters:
    """`sim_bridge` simulating `arm` (its cameras from the model's spec; waiting for a reset, pausing between
    episodes), `policy_node` serving `arm` on sim time, and `policy_watchdog`, which relays the node's stamped
    commands to the controller topics, as on a robot; the node serves `task` (a file with an instruction model
    starts every episode with that task's instruction). Returns what the node and watchdog were told."""
    from sim.env import DEFAULT_ARM, StackingConfig
    from sim.tasks import DEFAULT_TASK

    arm, task = arm or DEFAULT_ARM, task or DEFAULT_TASK
    unknown = set(perturbation or {}) - set(PERTURBATION_OPTIONS)
    if unknown:
        raise ValueError(f"unknown perturbation option(s) {sorted(unknown)}; known: {PERTURBATION_OPTIONS}")
    served = arm_parameters(policy_path, arm)  # a file that does not serve the arm: refused here, with the reason
    perturb = [a for name, value in (perturbation or {}).items() for a in ("-p", f"{name}:={float(value)!r}")]
    procs.start("bridge", _console_script("sim_bridge", "sim.bridge") + [
        "--ros-args", "-p", f"arm:={arm}", "-p", f"task:={task}", "-p", f"seed:={first_seed}",
        "-p", f"model_path:={policy_path}", "-p", f"real_time_factor:={float(real_time_factor)}",
        "-p", f"max_steps:={max_steps}", "-p", "wait_for_reset:=true", "-p", "pause_when_done:=true", *perturb,
        "-p", f"parallel_cameras:={str(parallel_cameras).lower()}",
        "--log-level", "warn"])
    procs.start("node", _console_script("policy_node", "gato_ros.node") + [
        "--ros-args", "-p", f"model_path:={policy_path}", "-p", f"provider:={provider}", "-p", "threads:=1",
        "-p", "use_sim_time:=true", "-p", f"direct_output:={str(not watchdog).lower()}", "-p", f"task:={task}",
        *[a for param in served.node for a in ("-p", param)]])
    if watchdog:
        procs.start("watchdog", _console_script("policy_watchdog", "gato_ros.watchdog") + [
            "--ros-args", "-p", "use_sim_time:=true", "-p", f"control_rate_hz:={float(StackingConfig().control_hz)!r}",
            *[a for param in served.watchdog for a in ("-p", param)]])
    return served


def wait_until_connected(supervisor: Supervisor, procs: Processes, served: ArmParameters,
                         record: Path | None = None) -> None:
    """The bridge's services up, the node active, each side discovered by the other (the commands on the
    arm controller topic `served` names), and the recorder (with `record`, a bag directory) subscribed."""
    _wait(lambda: supervisor.bridge_reset.service_is_ready() and supervisor.node_active(), 120.0,
          "the bridge's services and the policy node to become active", procs)
    node = supervisor.node
    _wait(lambda: node.count_publishers(served.command_topic) >= 1 and node.count_subscribers("/joint_states") >= 1,
          30.0, "the node and the bridge to discover each other", procs)
    wait_for_the_loop(supervisor, procs, served.gripper)
    if record is not None:
        _start_recorder(procs, record, node)


def wait_for_the_loop(supervisor: Supervisor, procs: Processes, gripper: bool, timeout_s: float = 60.0) -> None:
    """A command through the whole loop (bridge → node → watchdog → bridge) before the first episode.

    The graph this process sees says nothing of whether each process has matched the others' endpoints:
    discovery of one link can lag seconds behind on a loaded machine, and an episode started then runs on
    stale commands. So a throwaway episode (the bridge's next seed) runs until the bridge counts an arm
    command (and with `gripper`, a gripper command), and the bridge is paused there; each measured episode then
    starts with the usual resets."""
    supervisor.trigger(supervisor.bridge_reset)

    def through() -> bool:
        status = supervisor.status()
        return status["commands"] >= 1 and (status["gripper_commands"] >= 1 or not gripper)

    _wait(through, timeout_s, "the first command through the loop", procs, poll_s=0.1)
    supervisor.trigger(supervisor.bridge_pause)


def run_episode(supervisor: Supervisor, procs: Processes, seed: int, period: float, timeout_s: float,
                real_time_factor: float) -> RosEpisodeResult:
    """One episode: seed the bridge, reset the node's context, reset the bridge, wait until the episode is done."""
    supervisor.set_seed(seed)
    if not supervisor.trigger(supervisor.node_reset).success:
        raise RuntimeError(f"the policy node refused ~/reset:\n{procs.log_tail('node')}")
    supervisor.trigger(supervisor.bridge_reset)

    def finished() -> bool:
        status = supervisor.status()
        return status["done"] or status.get("previous", {}).get("seed") == seed  # NaN: bridge reset

    # Poll gently: the bridge pauses at the end, so a late look costs nothing, and CPU is the loop's.
    _wait(finished, timeout_s, f"episode seed {seed}", procs, poll_s=0.25)
    time.sleep(3 * period / max(real_time_factor, 0.05))  # the answer to the last observation lands
    status = supervisor.status()
    if status["seed"] != seed:
        status = status["previous"]
    return _result(status, period)


def ros_summary(run: RosRun) -> dict:
    """Over-ROS loop health across episodes: rates, stale-command share, rejected commands, latency."""
    results = run.results
    if not results:
        return {}
    steps = sum(r.steps for r in results)
    latency = np.concatenate([r.step_ms for r in results]) if steps else np.zeros(0)
    diag = run.node_diagnostics
    return {
        "control_rate_hz": {"mean": float(np.mean([r.control_rate_hz for r in results])),
                            "min": float(min(r.control_rate_hz for r in results))},
        "wall_rate_hz": {"mean": float(np.mean([r.wall_rate_hz for r in results])),
                         "min": float(min(r.wall_rate_hz for r in results))},
        "stale_steps": sum(r.stale_steps for r in results),
        "stale_share": sum(r.stale_steps for r in results) / max(steps, 1),
        "rejected_commands": sum(r.rejected_commands for r in results),
        "command_latency_ms": {"p50": float(np.percentile(latency, 50)), "p99": float(np.percentile(latency, 99)),
                               "max": float(latency.max())} if latency.size else {},
        "node_step_latency_ms": {"p50": diag.get("step_latency_p50_ms", ""),
                                 "p99": diag.get("step_latency_p99_ms", "")},
        "node_deadline_misses": diag.get("deadline_misses", ""),
        # The node's image decode + resize per policy tick, all cameras (its last diagnostics: the last 1000 ticks).
        "node_image_decode_ms": {"p50": diag.get("image_decode_p50_ms", ""),
                                 "p99": diag.get("image_decode_p99_ms", "")},
        # Steps the watchdog put its safe action on the arm (the policy was silent for 1.5 periods): the bridge
        # counts them as answered, so they are reported here (as of the watchdog's last diagnostics, 1 Hz).
        "watchdog_safe_commands": int(run.watchdog_diagnostics.get("safe_commands", "0") or 0),
        "exit_codes": run.exit_codes,
    }


def describe(ros: dict) -> str:
    """One line of `ros_summary`: what a user checks first."""
    lat = ros.get("command_latency_ms", {})
    return (f"over ROS: control rate {ros['control_rate_hz']['mean']:.2f} Hz (min {ros['control_rate_hz']['min']:.2f}) "
            f"on the sim clock, real-time rate {ros['wall_rate_hz']['mean']:.2f} Hz; observation → command latency "
            f"p50 {lat.get('p50', float('nan')):.1f} ms p99 {lat.get('p99', float('nan')):.1f} ms; "
            f"stale commands {ros['stale_share']:.1%} of steps; rejected commands {ros['rejected_commands']}; "
            f"watchdog safe actions {ros.get('watchdog_safe_commands', 0)}")
