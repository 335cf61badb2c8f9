"""Gato conditioning that lasts (issue 13): a demonstration prompt or an instruction's text tokens pinned at the
start of the context for the whole episode, laid out in training exactly as the runtime serves it; the
instruction model (SentencePiece) travels in the file and refuses words outside its vocabulary."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from gato_ros import contract
from gato_ros import tokenizer as tok
from gato_ros.cli import main
from gato_ros.data import EpisodeWriter, read_dataset
from gato_ros.instructions import InstructionError, InstructionTokenizer, train_instruction_model
from gato_ros.runtime import PolicyRuntime
from gato_ros.sequences import SequenceDataset
from gato_ros.spec import EmbodimentSpec
from gato_ros.train import load_served
from sim.spec import stacking_spec
from sim.tasks import TASKS

torch.set_num_threads(1)
SPEC = stacking_spec()
STEP = tok.timestep_token_count(SPEC)  # 42
PROMPT_STEPS = 1
WINDOW = 4 * STEP  # the window trained on and the runtime's cache: the prompt's timestep and three of the episode
REACH = 1024  # the attention reach: a pinned prefix must stay within it for a whole episode
TASK_NAMES = ["stack_red_on_blue", "stack_blue_on_red"]


def write_episodes(root: Path, spec: EmbodimentSpec, episodes: int = 6, steps: int = 9) -> Path:
    """Random episodes recorded as `gato-ros collect` records them: task and its instruction in the metadata."""
    rng = np.random.default_rng(7)
    with EpisodeWriter(root, spec) as writer:
        for e in range(episodes):
            task = TASK_NAMES[e % 2]
            obs = {o.name: rng.normal(size=(steps, *o.shape)).astype(np.float32) for o in spec.observations}
            actions = np.stack([rng.choice(a.values, steps) if a.kind == "discrete"
                                else rng.uniform(-a.limit, a.limit, steps) for a in spec.actions], 1)
            writer.add_episode(obs, actions, {"seed": e, "arm": "panda", "task": task,
                                              "instruction": TASKS[task].instruction})
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_episodes(tmp_path_factory.mktemp("data") / "panda", SPEC)


@pytest.fixture(scope="module")
def policy(data: Path) -> Path:
    out = data.parent.parent / "run"
    assert main(["train", "--data", str(data), "--out", str(out), "--preset", "tiny", "--context-window",
                 str(REACH), "--seq-len", str(WINDOW), "--steps", "2", "--batch-size", "4", "--eval-every", "2",
                 "--val-fraction", "0.2",
                 "--prompt-prob", "0.25", "--prompt-steps", str(PROMPT_STEPS), "--instruction-prob", "0.25",
                 "--no-progress"]) == 0
    path = out.parent / "conditioned.onnx"
    assert main(["export", "--checkpoint", str(out), "--out", str(path), "--variants", "fp32",
                 "--attention", "plain", "--context-tokens", str(WINDOW), "--trained-capacities", str(WINDOW)]) == 0
    return path


def test_instruction_model_reads_the_instruction_set_and_refuses_other_words() -> None:
    reader = InstructionTokenizer(train_instruction_model(t.instruction for t in TASKS.values()))
    ids = reader.encode("Stack the RED cube on the blue cube")
    assert len(ids) == 8 and (ids >= 0).all() and (ids < contract.TEXT_VOCAB_SIZE).all()
    assert not np.array_equal(ids, reader.encode("stack the blue cube on the red cube")), "word order is kept"
    with pytest.raises(InstructionError, match="'grab'.*vocabulary"):
        reader.encode("grab the red cube")
    with pytest.raises(InstructionError):
        reader.encode("   ")


def test_checkpoint_and_file_declare_the_conditioning(policy: Path, capsys) -> None:
    served = load_served(policy.parent / "run")
    assert served is not None and served.conditioning is not None
    assert served.conditioning.prompt_steps == PROMPT_STEPS
    assert served.conditioning.instructions == {t: TASKS[t].instruction for t in TASK_NAMES}
    meta = {p.key: p.value for p in onnx.load(str(policy), load_external_data=False).metadata_props}
    assert contract.Conditioning.from_json(meta[contract.META_CONDITIONING]) == served.conditioning
    assert main(["info", str(policy), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)["conditioning"]
    assert shown == {"prompt_steps": PROMPT_STEPS, "instructions": served.conditioning.instructions}


def test_fused_export_of_a_pinned_checkpoint_is_refused(policy: Path) -> None:
    with pytest.raises(SystemExit, match="--attention plain"):
        main(["export", "--checkpoint", str(policy.parent / "run"), "--out", str(policy.parent / "fused.onnx"),
              "--variants", "fp32"])


def stream_of(runtime: PolicyRuntime, episode: tuple[dict, np.ndarray], steps: int) -> dict[int, int]:
    """Teacher-force `steps` timesteps of `episode`; return what the cache holds: position -> token id."""
    fed: dict[int, int] = {}
    forward = runtime.forward

    def recording(ids, local, *rest):
        for p, t in zip(runtime.position + np.arange(len(ids)), ids, strict=True):
            fed[int(p)] = int(t)
        return forward(ids, local, *rest)

    runtime.forward = recording
    try:
        for t in range(steps):
            obs = {k: v[t] for k, v in episode[0].items()}
            runtime.step_tokens(obs, teacher=tok.tokenize_action(runtime.spec, episode[1][t]))
    finally:
        del runtime.forward
    return fed


def visible(runtime: PolicyRuntime) -> np.ndarray:
    positions = runtime.past_positions[0]
    return np.sort(positions[positions != runtime.info.empty_position])


def test_pinned_instruction_stays_in_the_cache_while_the_episode_rolls(policy: Path, data: Path) -> None:
    runtime = PolicyRuntime(policy, provider="cpu", threads=1)
    text = runtime.instruction_for("stack_blue_on_red")
    runtime.reset(instruction=text)
    n = runtime.pinned
    assert n == len(runtime.instructions.encode(text)) == runtime.position > 0
    episode = read_dataset(data).episode(0)
    stream_of(runtime, episode, 9)  # 9 timesteps: far past the window of 4
    held = visible(runtime)
    assert list(held[:n]) == list(range(n)), "the instruction's positions are still in the cache"
    assert len(held) == runtime.capacity and held[-1] == runtime.position - 1, "the rest rolls: the newest tokens"
    runtime.reset()
    assert runtime.pinned == 0


def test_pinned_prompt_context_is_the_training_window_of_the_same_step(policy: Path, data: Path) -> None:
    """Deep into an episode, the tokens and positions the runtime holds are those of a training window that starts
    with the same demonstration (its last PROMPT_STEPS steps) and sits at the same step: what training taught."""
    runtime = PolicyRuntime(policy, provider="cpu", threads=1)
    stored = read_dataset(data)
    demo, episode = stored.episode(2), stored.episode(0)  # both stack_red_on_blue
    runtime.reset(prompt={"observations": demo[0], "actions": demo[1]})
    assert runtime.pinned == PROMPT_STEPS * STEP
    steps = 7
    fed = stream_of(runtime, episode, steps)
    held = visible(runtime)

    windows = SequenceDataset(stored, WINDOW, prompt_prob=1.0, prompt_tokens=PROMPT_STEPS * STEP, train=True,
                              pin_prefix=True, seed=0)
    start = steps - (WINDOW - PROMPT_STEPS * STEP) // STEP  # the window whose episode part ends at this tick
    for i, (j, s) in enumerate(windows.index):
        if (j, s) != (0, start):
            continue
        for epoch in range(200):  # draw until the prompt is episode 2's end, as the runtime's prompt is
            windows.set_epoch(epoch)
            item = windows[i]
            prompt = item["input_ids"][: PROMPT_STEPS * STEP].numpy()
            demo_tokens = tok.tokenize_episode(SPEC, demo[0], demo[1])["tokens"][-PROMPT_STEPS * STEP:]
            if np.array_equal(prompt, demo_tokens):
                break
        else:
            pytest.fail("no window drew episode 2's end as its prompt")
        break
    positions, ids = item["position_ids"].numpy(), item["input_ids"].numpy()
    real = ids != tok.PAD_TOKEN
    # Every token the training window shows (before the tick's last action) is in the runtime's cache at the same
    # position with the same id, the pinned prompt included.
    shown = {int(p): int(t) for p, t in zip(positions[real], ids[real], strict=True) if p < runtime.position}
    assert set(shown) <= set(held.tolist())
    prompt_ids = tok.tokenize_episode(SPEC, {k: v[-PROMPT_STEPS:] for k, v in demo[0].items()},
                                      demo[1][-PROMPT_STEPS:])["tokens"]
    for p, t in shown.items():
        assert (prompt_ids[p] if p < runtime.pinned else fed[p]) == t, p
    assert positions[PROMPT_STEPS * STEP] == PROMPT_STEPS * STEP + start * STEP


def test_a_refused_instruction_leaves_the_episode_as_it_was(policy: Path, data: Path) -> None:
    runtime = PolicyRuntime(policy, provider="cpu", threads=1)
    runtime.reset(instruction=runtime.instruction_for("stack_red_on_blue"))
    stream_of(runtime, read_dataset(data).episode(0), 2)
    before = (runtime.position, runtime.pinned, runtime.past_positions.copy())
    with pytest.raises(InstructionError, match="'purple'"):
        runtime.reset(instruction="stack the purple cube")
    with pytest.raises(ValueError, match="not both"):
        runtime.reset(prompt={"observations": {}, "actions": np.zeros((0, 8))}, instruction="lift the red cube")
    assert (runtime.position, runtime.pinned) == before[:2] and np.array_equal(runtime.past_positions, before[2])


def test_the_pinned_instruction_is_attended_after_the_window_has_rolled(policy: Path, data: Path) -> None:
    """Many windows into an episode, the next tick's logits change when the pinned instruction's slots are hidden:
    the model still attends to it directly. (A model trained 2 steps picks the same tokens for every context and
    its logits move by ~1e-6, so bit-identity is the test: an unattended prefix gives the same computation.)"""
    runtime = PolicyRuntime(policy, provider="cpu", threads=1)
    episode = read_dataset(data).episode(1)
    runtime.reset(instruction=runtime.instruction_for(TASK_NAMES[0]))
    stream_of(runtime, episode, 7)
    assert runtime.position > runtime.capacity + 2 * STEP, "the episode's tokens have rolled"
    saved = ([c.copy() for c in runtime.cache], runtime.past_positions.copy(), runtime.position, runtime._pending)
    obs = {k: v[7] for k, v in episode[0].items()}

    def next_logits(hide_prefix: bool) -> np.ndarray:
        for c, s in zip(runtime.cache, saved[0], strict=True):
            c[...] = s
        runtime.past_positions[...] = saved[1]
        runtime.position, runtime._pending = saved[2], saved[3]
        if hide_prefix:
            runtime.past_positions[0, : runtime.pinned] = runtime.info.empty_position
        runtime.step_tokens(obs)
        return runtime._logits.copy()

    seen = next_logits(False)
    assert np.array_equal(seen, next_logits(False)), "deterministic"
    assert not np.array_equal(seen, next_logits(True)), "hiding the pinned instruction changed nothing"


def test_training_refuses_a_reach_shorter_than_an_episode(data: Path, tmp_path: Path, capsys) -> None:
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--preset", "tiny",
                 "--context-window", str(WINDOW), "--steps", "1", "--batch-size", "4", "--prompt-prob", "0.25",
                 "--prompt-steps", "1", "--no-progress"])
    assert code == 2
    assert "attention reach" in capsys.readouterr().err


def test_a_file_without_conditioning_keeps_rolling_prompts() -> None:
    runtime = PolicyRuntime(Path(__file__).parents[1] / "models" / "stack_int8.onnx", provider="cpu", threads=1)
    assert runtime.info.conditioning is None
    with pytest.raises(InstructionError, match="no instruction model"):
        runtime.reset(instruction="lift the red cube")
    spec = runtime.spec
    steps = runtime.capacity // tok.timestep_token_count(spec) + 2
    rng = np.random.default_rng(0)
    demo = {"observations": {o.name: rng.normal(size=(steps, *o.shape)) for o in spec.observations},
            "actions": np.stack([rng.choice(a.values, steps) if a.kind == "discrete" else np.zeros(steps)
                                 for a in spec.actions], 1)}
    runtime.reset(prompt=demo)
    assert runtime.pinned == 0 and runtime.position == steps * tok.timestep_token_count(spec)
    assert json.loads(json.dumps(runtime.info.tasks)) == list(runtime.info.tasks)


# ---------------------------------------------------------------- a short reach with a pinned span
SPAN = 48  # positions 0..47 hold the prefix; the episode's own tokens are seen one timestep back
SPANNED_CACHE = SPAN + 2 * STEP


@pytest.fixture(scope="module")
def spanned(data: Path) -> Path:
    out = data.parent.parent / "spanned"
    assert main(["train", "--data", str(data), "--out", str(out), "--preset", "tiny", "--context-window", str(STEP),
                 "--pinned-span", str(SPAN), "--seq-len", str(WINDOW), "--steps", "2", "--batch-size", "4",
                 "--eval-every", "2", "--val-fraction", "0.2", "--prompt-prob", "0.25", "--prompt-steps",
                 str(PROMPT_STEPS), "--instruction-prob", "0.5", "--no-progress"]) == 0
    path = out.parent / "spanned.onnx"
    assert main(["export", "--checkpoint", str(out), "--out", str(path), "--variants", "fp32", "--attention", "plain",
                 "--context-tokens", str(SPANNED_CACHE), "--trained-capacities", str(SPANNED_CACHE)]) == 0
    return path


def test_a_pinned_span_starts_the_episode_after_it_as_training_does(spanned: Path, data: Path) -> None:
    runtime = PolicyRuntime(spanned, provider="cpu", threads=1)
    assert runtime.info.config.pinned_span == SPAN and runtime.info.config.context_window == STEP
    stored = read_dataset(data)
    episode = stored.episode(0)
    text = runtime.instruction_for(stored.episodes[0]["task"])
    runtime.reset(instruction=text)
    assert runtime.pinned == len(runtime.instructions.encode(text)) and runtime.position == SPAN
    steps = 5
    fed = stream_of(runtime, episode, steps)
    windows = SequenceDataset(stored, WINDOW, instruction_prob=1.0, pin_prefix=True, pinned_span=SPAN,
                              instructions={t: runtime.instructions.encode(TASKS[t].instruction) for t in TASK_NAMES})
    i = windows.index.index((0, steps - 2))
    item = windows[i]
    positions, ids = item["position_ids"].numpy(), item["input_ids"].numpy()
    n = runtime.pinned
    assert list(positions[:n]) == list(range(n)) and positions[n] == SPAN + (steps - 2) * STEP
    held = set(visible(runtime).tolist())
    for p, t in zip(positions, ids, strict=True):
        if p < runtime.position and (p < n or p >= runtime.position - STEP):
            assert p in held and (ids[p] if p < n else fed[int(p)]) == t, p
    runtime.reset()  # no prefix: the episode still starts at the span, nothing is pinned
    assert runtime.pinned == 0 and runtime.position == SPAN


def test_a_pinned_span_sees_its_prefix_and_only_the_reach_of_the_episode(spanned: Path, data: Path) -> None:
    """Deep into an episode the next tick's logits depend on the pinned instruction and on the last timestep's
    tokens, and on nothing older (bit-identical when an older token is hidden: a masked key weighs exactly 0)."""
    runtime = PolicyRuntime(spanned, provider="cpu", threads=1)
    episode = read_dataset(data).episode(1)
    runtime.reset(instruction=runtime.instruction_for(TASK_NAMES[1]))
    stream_of(runtime, episode, 6)
    saved = ([c.copy() for c in runtime.cache], runtime.past_positions.copy(), runtime.position, runtime._pending)
    obs = {k: v[6] for k, v in episode[0].items()}

    def next_logits(hide: np.ndarray | None = None) -> np.ndarray:
        for c, s in zip(runtime.cache, saved[0], strict=True):
            c[...] = s
        runtime.past_positions[...] = saved[1]
        runtime.position, runtime._pending = saved[2], saved[3]
        if hide is not None:
            runtime.past_positions[0, np.isin(saved[1][0], hide)] = runtime.info.empty_position
        runtime.step_tokens(obs)
        return runtime._logits.copy()

    seen = next_logits()
    end = saved[2]
    assert np.array_equal(seen, next_logits()), "deterministic"
    assert not np.array_equal(seen, next_logits(np.arange(runtime.pinned))), "the pinned instruction is attended"
    assert not np.array_equal(seen, next_logits(np.array([end - 1]))), "the last tokens are attended"
    older = np.arange(SPAN, end - STEP)
    assert np.isin(older, saved[1][0]).any(), "the cache holds tokens beyond the reach"
    assert np.array_equal(seen, next_logits(older)), "tokens beyond the reach are not attended"


def test_a_prefix_longer_than_the_pinned_span_is_refused(data: Path, tmp_path: Path, capsys) -> None:
    code = main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "--preset", "tiny",
                 "--context-window", str(STEP), "--pinned-span", str(STEP - 1), "--seq-len", str(WINDOW),
                 "--steps", "1", "--batch-size", "4", "--prompt-prob", "0.25", "--prompt-steps", "1", "--no-progress"])
    assert code == 2
    assert "--pinned-span" in capsys.readouterr().err


def test_step_local_fine_tune_of_a_checkpoint_without_action_local_positions_is_refused(
        policy: Path, data: Path, tmp_path: Path, capsys) -> None:
    checkpoint = policy.parent / "run"  # trained from the preset: local positions on observation tokens only
    code = main(["train", "--data", str(data), "--init", str(checkpoint), "--out", str(tmp_path / "run"),
                 "--step-local-attention", "--steps", "1", "--batch-size", "4", "--no-progress"])
    assert code == 2
    assert "--step-local-attention" in capsys.readouterr().err


def test_fused_export_of_a_pinned_span_model_is_refused(spanned: Path) -> None:
    from gato_ros.export import export
    from gato_ros.train import load_checkpoint

    model, _, spec = load_checkpoint(spanned.parent / "spanned")
    with pytest.raises(ValueError, match="attention='plain'"):
        export(model, spec, spanned.parent / "fused.onnx", attention="fused", check=False)
