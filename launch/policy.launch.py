"""Launch the Gato policy node and its watchdog; with use_sim:=true also the PyBullet arm on sim time.

    ros2 launch gato_ros policy.launch.py                      # a real arm: configure + activate yourself
    ros2 launch gato_ros policy.launch.py model:=/path/to/policy.onnx namespace:=left_arm
    ros2 launch gato_ros policy.launch.py model:=/path/to/generalist_int8.onnx task:=lift_red   # one of its tasks
    ros2 launch gato_ros policy.launch.py use_sim:=true        # the simulated arm; autostart on

The policy node is a lifecycle node (`gato_policy`); `policy_watchdog` relays its stamped commands to the
controllers and sends the safe action when they stop. Both read the same params file. A launch argument
overrides the params file only when it is given: every one defaults to empty.
"""

from pathlib import Path

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.conditions import IfCondition
from launch.launch_context import LaunchContext
from launch.launch_description import LaunchDescription
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import LifecycleNode, Node

from gato_ros.launch_params import parameter_overrides


def _nodes(context: LaunchContext) -> list:
    given = {
        "model": LaunchConfiguration("model").perform(context),
        "rate": LaunchConfiguration("rate").perform(context),
        "autostart": LaunchConfiguration("autostart").perform(context),
        "output_mode": LaunchConfiguration("output_mode").perform(context),
        "arm": LaunchConfiguration("arm").perform(context),
        "task": LaunchConfiguration("task").perform(context),
        "use_sim": LaunchConfiguration("use_sim").perform(context),
    }
    overrides = parameter_overrides(given)
    parameters = [LaunchConfiguration("params_file").perform(context)] + ([overrides] if overrides else [])
    namespace = LaunchConfiguration("namespace").perform(context)
    return [
        LifecycleNode(package="gato_ros", executable="policy_node", name="gato_policy", namespace=namespace,
                      output="screen", emulate_tty=True, parameters=parameters),
        Node(package="gato_ros", executable="policy_watchdog", name="policy_watchdog", namespace=namespace,
             output="screen", emulate_tty=True, parameters=parameters),
    ]


def generate_launch_description() -> LaunchDescription:
    share = Path(get_package_share_directory("gato_ros"))
    return LaunchDescription([
        DeclareLaunchArgument("model", default_value="", description="ONNX policy file; empty = the params file's"),
        DeclareLaunchArgument("rate", default_value="", description="control rate in Hz; empty = the params file's"),
        DeclareLaunchArgument("autostart", default_value="",
                              description="true: walk to active at start; empty = the params file's (false), or "
                                          "true with use_sim"),
        DeclareLaunchArgument("output_mode", default_value="",
                              description="effort | position | velocity | trajectory; empty = the params file's"),
        DeclareLaunchArgument("arm", default_value="",
                              description="which of the model's arms to serve (gato-ros info); empty = its default"),
        DeclareLaunchArgument("task", default_value="",
                              description="which of the tasks the model was trained on for the arm to perform "
                                          "(gato-ros info); empty = the first"),
        DeclareLaunchArgument("params_file", default_value=str(share / "config" / "policy.yaml"),
                              description="parameters of the policy node and the watchdog (YAML)"),
        DeclareLaunchArgument("namespace", default_value="", description="namespace of the nodes and their topics"),
        DeclareLaunchArgument("use_sim", default_value="false",
                              description="also start the PyBullet arm (sim_bridge) and run on its /clock"),
        Node(
            package="gato_ros",
            executable="sim_bridge",
            name="sim_bridge",
            namespace=LaunchConfiguration("namespace"),
            output="screen",
            condition=IfCondition(LaunchConfiguration("use_sim")),  # it publishes /clock: it runs on wall time
            # A seeing model's spec chooses the cameras the bridge renders ("" = the bridge's own parameters); the
            # bridge simulates the arm the node serves and judges the task it performs ("" = the model's default).
            parameters=[{"model_path": LaunchConfiguration("model"), "arm": LaunchConfiguration("arm"),
                         "task": LaunchConfiguration("task")}],
        ),
        OpaqueFunction(function=_nodes),
    ])
