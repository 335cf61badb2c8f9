"""Launch the Gato policy node; with use_sim:=true also the PyBullet arm (sim_bridge) on sim time.

    ros2 launch gato_ros policy.launch.py model:=/path/to/policy.onnx
    ros2 launch gato_ros policy.launch.py use_sim:=true
"""

from pathlib import Path

from ament_index_python.packages import get_package_share_directory
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition
from launch.launch_description import LaunchDescription
from launch.substitutions import LaunchConfiguration, PythonExpression
from launch_ros.actions import Node
from launch_ros.parameter_descriptions import ParameterValue


def generate_launch_description() -> LaunchDescription:
    share = Path(get_package_share_directory("gato_ros"))
    model = LaunchConfiguration("model")
    rate = LaunchConfiguration("rate")
    params_file = LaunchConfiguration("params_file")
    use_sim = LaunchConfiguration("use_sim")
    return LaunchDescription([
        DeclareLaunchArgument("model", default_value=str(share / "models" / "stack_int8.onnx"),
                              description="ONNX policy file"),
        DeclareLaunchArgument("rate", default_value="0.0", description="control rate in Hz; 0 = the model's rate"),
        DeclareLaunchArgument("params_file", default_value=str(share / "config" / "policy.yaml"),
                              description="node parameters (YAML); model and rate override it"),
        DeclareLaunchArgument("use_sim", default_value="false",
                              description="also start the PyBullet arm (sim_bridge) and run on its /clock"),
        Node(
            package="gato_ros",
            executable="sim_bridge",
            name="sim_bridge",
            output="screen",
            condition=IfCondition(use_sim),  # it publishes /clock, so it runs on wall time itself
        ),
        Node(
            package="gato_ros",
            executable="policy_node",
            name="gato_policy",
            output="screen",
            emulate_tty=True,
            parameters=[
                params_file,
                {
                    "model_path": model,
                    "control_rate_hz": ParameterValue(PythonExpression(["float(", rate, ")"]), value_type=float),
                    "use_sim_time": ParameterValue(use_sim, value_type=bool),
                },
            ],
        ),
    ])
