"""Rebuild a GatoModel checkpoint (safetensors, `gato_ros.train.load_checkpoint` format) from a gato_ros ONNX
file, dequantizing int8 weights: the fp32 model that computes exactly the weights the file ships.

    python scripts/recover_checkpoint.py models/stack_int8.onnx checkpoints/stack_recovered
"""

import sys

from gato_ros.recover import recover_checkpoint

if __name__ == "__main__":
    print(f"wrote {recover_checkpoint(sys.argv[1], sys.argv[2])}")
