"""ament_python package and pip-installable project in one.

`colcon build` on a ROS 2 robot and `pip install -e .[ros,sim,train,dev]` on a plain machine both
use this file. The ROS 2 wheels live in the `ros` extra so a distro install is never shadowed.
"""

from glob import glob

from setuptools import find_packages, setup

PACKAGE = "gato_ros"

RUNTIME = [
    "numpy>=1.26",
    "onnxruntime-gpu>=1.20; platform_machine == 'x86_64'",
    "onnxruntime>=1.20; platform_machine != 'x86_64'",
    "opencv-python-headless>=4.9",
    "sentencepiece>=0.2",  # a policy's instruction text (gato_ros.instructions)
]
ROS = [
    "ros-rclpy[fastrtps]",
    "ros-std-msgs",
    "ros-sensor-msgs",
    "ros-trajectory-msgs",
    "ros-diagnostic-msgs",
    "ros-lifecycle-msgs",
    "ros-std-srvs",
    "ros-geometry-msgs",
    "ros-rosgraph-msgs",
]
TRAIN = ["torch==2.13.0", "onnx>=1.16", "onnx-ir", "safetensors", "tqdm", "matplotlib"]
SIM = ["pybullet", "gymnasium>=1.0", "tqdm", "matplotlib"]
# rosbag2 bags in MCAP storage without a ROS install: the writer/reader (chunked, zstd) and the CDR decoder.
RECORD = ["mcap>=1.6", "mcap-ros2-support>=0.5", "pyyaml", "matplotlib"]
DEV = TRAIN + SIM + ROS + RECORD + [
    "pytest",
    "pytest-timeout",
    "hypothesis",
    "rosbags",  # an independent rosbag2 reader: tests open our bags with it
    "ruff",
    "colcon-core",
    "colcon-ros",
    "colcon-python-setup-py",
]

setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(include=[PACKAGE, f"{PACKAGE}.*", "sim", "sim.*"]),
    data_files=[
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
        (f"share/{PACKAGE}/launch", glob("launch/*.launch.py")),
        (f"share/{PACKAGE}/config", glob("config/*.yaml") + glob("config/*.json")),
        (f"share/{PACKAGE}/models", glob("models/*.onnx") + glob("models/*.md") + glob("models/*.json")),
    ],
    package_data={PACKAGE: ["py.typed"]},
    install_requires=RUNTIME,
    extras_require={"ros": ROS, "train": TRAIN, "sim": SIM, "record": RECORD, "dev": DEV},
    zip_safe=True,
    maintainer="gato_ros developers",
    maintainer_email="gato-ros@example.com",
    description="Real-time ROS 2 runtime for a Gato-style generalist transformer policy",
    license="Apache-2.0",
    python_requires=">=3.10",
    entry_points={
        "console_scripts": [
            "gato-ros = gato_ros.cli:main",
            "policy_node = gato_ros.node:main",
            "sim_bridge = sim.bridge:main",
            "policy_watchdog = gato_ros.watchdog:main",
        ],
    },
)
