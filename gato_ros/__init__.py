"""gato_ros: a real-time ROS 2 runtime for a Gato-style generalist transformer policy."""

__version__ = "0.1.0"
