"""The shipped int8 policy against its fp32 original, on two recorded expert episodes.

models/stack_fp32_reference.npz holds the observations and the fp32 model's greedy action tokens
(written when the model was exported; the fp32 file is not shipped). The int8 model decodes the same
stream teacher-forced on those tokens, so every step is compared in the same context.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gato_ros import tokenizer as tk

MODELS = Path(__file__).resolve().parents[1] / "models"
SHIPPED = MODELS / "stack_int8.onnx"
REFERENCE = MODELS / "stack_fp32_reference.npz"

pytestmark = pytest.mark.skipif(not (SHIPPED.exists() and REFERENCE.exists()), reason="no shipped model yet")


@pytest.fixture(scope="module")
def compared() -> tuple[np.ndarray, np.ndarray, object]:
    from gato_ros.runtime import PolicyRuntime, teacher_forced_tokens

    ref = dict(np.load(REFERENCE))
    runtime = PolicyRuntime(str(SHIPPED), provider="cpu", threads=1)
    got, _ = teacher_forced_tokens(runtime, ref)
    return got, ref["tokens"], runtime.spec


def test_int8_picks_the_fp32_action_tokens(compared) -> None:
    got, expected, _ = compared
    # Measured at export: 80.7 % exact, 95.2 % within 3 bins, gripper 100 %. Soft-label training leaves
    # neighbouring bins near-tied and any 8-bit noise flips such ties: weight-only 8-bit with fp32 compute
    # (MatMulNBits) reached only 87.4 % exact, at twice the step time (scripts/quant_agreement.py).
    assert (got == expected).mean() >= 0.77
    assert (np.abs(got - expected) <= 3).mean() >= 0.92
    assert (got[:, -1] == expected[:, -1]).mean() >= 0.99


def test_int8_torques_stay_close_to_fp32(compared) -> None:
    got, expected, spec = compared
    err = np.abs([tk.detokenize_action(spec, g) - tk.detokenize_action(spec, r) for g, r in zip(got, expected,
                                                                                              strict=True)])[:, :7]
    # Measured at export: mean 0.012 N·m, p99 0.22 N·m, max 1.32 N·m (a near-zero torque changing sign).
    assert err.mean() <= 0.02
    assert np.percentile(err, 99) <= 0.4
    assert err.max() <= 2.5
