"""Training sequences from episodes: tokenized once, cut into windows of `seq_len` tokens.

A window starts at a timestep boundary of one episode and runs for `seq_len` tokens (padding past
the episode's end). Position t predicts token t + 1; the loss is on action tokens only. Position ids
count from 0: attention is relative, so this matches the runtime's absolute positions exactly.

Prompt conditioning (Gato section 3.3), optional: a share of the windows begin with a
demonstration of the same task taken from another episode -- half of those from its end, half from
anywhere in it -- and the rest of the window is the episode being trained on. No loss on the prompt.
Instruction conditioning, optional: a share of the windows begin instead with the text tokens of the
episode's instruction (`gato_ros.instructions`). With `pin_prefix` (files trained so declare
contract.Conditioning), the prefix sits at positions 0.. and the episode's tokens keep their true offset in
the episode after it (position P + token index), which is exactly the context the runtime builds when it
pins the prefix and rolls the episode's tokens; without it, positions simply count through the window.
A model with a pinned span (GatoConfig.pinned_span) reserves positions 0..span-1 for the prefix and sees them
from every later token: its episode tokens start at position span + their offset, prefix or not.

Several specs (a generalist: Gato serializes each body with its own tokens per timestep): each spec's
episodes are tokenized with that spec, and `MixedSpecWindows` serves them as one dataset, so a batch
mixes specs. Every window is `seq_len` tokens whatever its spec, padded with PAD_TOKEN after its
episode's end; padding only ever follows a window's real tokens, so causal attention hides it from
them, and it carries no loss (`loss_mask` is off): no padding reaches a loss term.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from gato_ros import contract
from gato_ros import tokenizer as tok
from gato_ros.data import EpisodeDataset
from gato_ros.spec import EmbodimentSpec


@dataclass
class TokenizedEpisode:
    tokens: np.ndarray  # (N,) int64
    local_positions: np.ndarray  # (N,) int64
    is_action: np.ndarray  # (N,) bool
    target_hi: np.ndarray  # (N,) int64: upper end of the valid id range of the token (actions)
    patches: np.ndarray  # (P, 3, 16, 16) uint8 pixels (4x smaller than float32 in memory)
    patch_intervals: np.ndarray  # (P, 4) int64 row/column intervals of each patch
    patch_index: np.ndarray  # (N,) int64: index into patches for PATCH_TOKEN slots, else -1
    steps: int
    step_tokens: int
    task: str
    aux: np.ndarray | None = None  # (steps, n) float32 normalized auxiliary targets, one row per timestep


def pixels_from_patches(patches: np.ndarray) -> np.ndarray:
    """Invert the tokenizer's pixel scaling, (p * 4 + 1) * 127.5, back to exact uint8."""
    return np.rint((patches.astype(np.float64) * 4.0 + 1.0) * 127.5).clip(0, 255).astype(np.uint8)


def patches_from_pixels(pixels: np.ndarray) -> np.ndarray:
    """The tokenizer's scaling: pixels to [-1, 1], divided by 4 (float32, same arithmetic)."""
    return (pixels.astype(np.float32) / contract.PIXEL_HALF_RANGE - 1.0) / contract.PATCH_VALUE_DIVISOR


def tokenize(spec: EmbodimentSpec, observations: dict[str, np.ndarray], actions: np.ndarray,
             task: str = "", observation_local_positions_only: bool = True) -> TokenizedEpisode:
    stream = tok.tokenize_episode(spec, observations, actions,
                                  observation_local_positions_only=observation_local_positions_only,
                                  pixel_patches=True)
    steps = actions.shape[0]
    step_tokens = tok.timestep_token_count(spec)
    his = np.array([tok.action_token_range(spec, i)[1] for i in range(spec.action_size)], dtype=np.int64)
    target_hi = np.zeros(len(stream["tokens"]), dtype=np.int64)
    target_hi[stream["loss_mask"]] = np.tile(his, steps)
    intervals = [tok.patch_intervals(o.shape[0], o.shape[1]) for o in spec.image_keys]
    per_step = np.concatenate(intervals) if intervals else np.zeros((0, 4), np.int64)
    is_patch = stream["tokens"] == tok.PATCH_TOKEN
    patch_index = np.full(len(stream["tokens"]), -1, dtype=np.int64)
    patch_index[is_patch] = np.arange(int(is_patch.sum()))
    return TokenizedEpisode(
        tokens=stream["tokens"],
        local_positions=stream["local_positions"],
        is_action=stream["loss_mask"],
        target_hi=target_hi,
        patches=stream["patches"],
        patch_intervals=np.tile(per_step, (steps, 1)),
        patch_index=patch_index,
        steps=steps,
        step_tokens=step_tokens,
        task=task,
    )


def instruction_piece(ids: np.ndarray, task: str) -> TokenizedEpisode:
    """An instruction's text tokens as a piece a window can start with: no local positions, no loss."""
    n = len(ids)
    return TokenizedEpisode(
        tokens=np.asarray(ids, dtype=np.int64), local_positions=np.full(n, contract.NO_LOCAL_POSITION, np.int64),
        is_action=np.zeros(n, bool), target_hi=np.zeros(n, np.int64),
        patches=np.zeros((0, 3, tok.PATCH_SIZE, tok.PATCH_SIZE), np.uint8), patch_intervals=np.zeros((0, 4), np.int64),
        patch_index=np.full(n, -1, np.int64), steps=0, step_tokens=max(n, 1), task=task,
    )


class SequenceDataset(Dataset):
    """Windows of `seq_len` tokens over tokenized episodes; item i starts at one timestep.

    episodes:      indices into `dataset` to use (train or validation split)
    stride_steps:  timesteps between window starts (1: every timestep starts a window)
    prompt_prob:   share of windows with a prompt (0 disables prompting)
    prompt_tokens: tokens of prompt (rounded down to whole timesteps)
    instruction_prob: share of windows that start with their episode's instruction (needs `instructions`)
    instructions:  task name -> the text token ids of its instruction
    pin_prefix:    lay prompted windows out as the runtime's pinned prefix does (see above)
    pinned_span:   the model's GatoConfig field of that name: every window's episode tokens then start at
                   position pinned_span + their offset in the episode, any prefix at 0..
    train:         sample patch positions inside their intervals and draw prompts at random;
                   otherwise interval means and a prompt choice fixed per item
    observation_local_positions_only: the model's GatoConfig field of that name (which tokens get local
                   positions)
    aux_key:       an auxiliary key of the dataset: items then carry `aux_targets` [L, n] (normalized) and
                   `aux_mask` [L] set at each separator token of the window's own episode (where the model
                   has seen that timestep's whole observation)
    """

    def __init__(
        self,
        dataset: EpisodeDataset,
        seq_len: int,
        episodes: list[int] | None = None,
        stride_steps: int = 1,
        prompt_prob: float = 0.0,
        prompt_tokens: int | None = None,
        train: bool = True,
        seed: int = 0,
        observation_local_positions_only: bool = True,
        aux_key: str | None = None,
        instruction_prob: float = 0.0,
        instructions: dict[str, np.ndarray] | None = None,
        pin_prefix: bool = False,
        pinned_span: int = 0,
    ) -> None:
        self.spec = dataset.spec
        self.aux_size = dataset.aux[aux_key].size if aux_key else 0
        self.seq_len = seq_len
        self.has_images = bool(self.spec.image_keys)
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.step_tokens = tok.timestep_token_count(self.spec)
        self.prompt_prob = prompt_prob
        prompt_tokens = seq_len // 4 if prompt_tokens is None else prompt_tokens
        self.prompt_steps = min(prompt_tokens, seq_len - self.step_tokens) // self.step_tokens
        if prompt_prob > 0 and self.prompt_steps < 1:
            raise ValueError(f"seq_len {seq_len} leaves no room for a prompt of whole timesteps "
                             f"({self.step_tokens} tokens each)")
        episodes = list(range(len(dataset))) if episodes is None else list(episodes)
        self.episodes: list[TokenizedEpisode] = []  # pre-tokenized once: epochs only slice arrays
        for i in episodes:
            observations, actions = dataset.episode(i)
            task = str(dataset.episodes[i].get("task", dataset.spec.name))
            self.episodes.append(tokenize(self.spec, observations, actions, task, observation_local_positions_only))
            if aux_key:
                self.episodes[-1].aux = dataset.aux[aux_key].normalize(dataset.aux_values(i, aux_key))
        self.instruction_prob = instruction_prob
        self.pin_prefix = pin_prefix
        self.pinned_span = pinned_span
        self.instructions = {task: instruction_piece(ids, task) for task, ids in (instructions or {}).items()}
        lacking = {ep.task for ep in self.episodes} - set(self.instructions)
        if instruction_prob > 0 and lacking:
            raise ValueError(f"no instruction for the task(s) {sorted(lacking)} of the episodes")
        self.by_task: dict[str, list[int]] = {}
        for j, ep in enumerate(self.episodes):
            self.by_task.setdefault(ep.task, []).append(j)
        self.index = [(j, s) for j, ep in enumerate(self.episodes) for s in range(0, ep.steps, stride_steps)]

    def __len__(self) -> int:
        return len(self.index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rng(self, i: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, self.epoch if self.train else 0, i))

    def _prefix(self, j: int, rng: np.random.Generator) -> tuple[TokenizedEpisode, int, int] | None:
        """What conditions window j, if anything: a demonstration prompt, or the instruction of its task."""
        if self.prompt_prob <= 0 and self.instruction_prob <= 0:
            return None
        u = rng.random()
        if u < self.prompt_prob:
            return self._prompt(j, rng)
        if u < self.prompt_prob + self.instruction_prob:
            piece = self.instructions[self.episodes[j].task]
            return piece, 0, len(piece.tokens)
        return None

    def _prompt(self, j: int, rng: np.random.Generator) -> tuple[TokenizedEpisode, int, int] | None:
        others = [o for o in self.by_task[self.episodes[j].task] if o != j]
        if not others:
            return None
        ep = self.episodes[others[int(rng.integers(len(others)))]]
        steps = min(self.prompt_steps, ep.steps)
        start = ep.steps - steps if rng.random() < 0.5 else int(rng.integers(0, ep.steps - steps + 1))
        return ep, start * ep.step_tokens, steps * ep.step_tokens

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        j, start_step = self.index[i]
        rng = self._rng(i)
        L = self.seq_len
        # Pieces: (episode, first token, token count, loss on?) laid out back to back.
        pieces: list[tuple[TokenizedEpisode, int, int, bool]] = []
        prefix = self._prefix(j, rng)
        if prefix is not None:
            pieces.append((*prefix, False))
        used = sum(p[2] for p in pieces)
        ep = self.episodes[j]
        first = start_step * ep.step_tokens
        pieces.append((ep, first, min(L + 1 - used, len(ep.tokens) - first), True))
        positions = np.arange(L, dtype=np.int64)
        if self.pinned_span:  # the episode from position pinned_span on, whatever the prefix (as the runtime does)
            if used > self.pinned_span:
                raise ValueError(f"a prefix of {used} tokens overflows the model's pinned span of {self.pinned_span}")
            positions[used:] = self.pinned_span + first + np.arange(L - used)
        elif self.pin_prefix and used:
            positions[used:] += first  # the episode's tokens at their offset in the episode, after the prefix

        n = L + 1  # one extra token so the last input position has a target
        tokens = np.full(n, tok.PAD_TOKEN, dtype=np.int64)
        local = np.zeros(n, dtype=np.int64)
        is_action = np.zeros(n, dtype=bool)
        target_hi = np.zeros(n, dtype=np.int64)
        patch_src: list[tuple[TokenizedEpisode, np.ndarray, np.ndarray]] = []
        aux_targets = np.zeros((n, self.aux_size), dtype=np.float32)
        aux_mask = np.zeros(n, dtype=bool)
        at = 0
        for piece, lo, count, with_loss in pieces:
            sl, dst = slice(lo, lo + count), slice(at, at + count)
            tokens[dst] = piece.tokens[sl]
            local[dst] = piece.local_positions[sl]
            is_action[dst] = piece.is_action[sl] & with_loss
            target_hi[dst] = piece.target_hi[sl]
            if self.has_images:
                patch_src.append((piece, piece.patch_index[sl], np.arange(at, at + count)))
            if self.aux_size and with_loss:
                separators = np.flatnonzero(piece.tokens[sl] == tok.SEPARATOR_TOKEN)
                aux_targets[at + separators] = piece.aux[(lo + separators) // piece.step_tokens]
                aux_mask[at + separators] = True
            at += count

        item = {
            "input_ids": torch.from_numpy(tokens[:L]),
            "position_ids": torch.from_numpy(positions),
            "local_positions": torch.from_numpy(local[:L]),
            "targets": torch.from_numpy(tokens[1:]),
            "loss_mask": torch.from_numpy(is_action[1:]),
            "target_hi": torch.from_numpy(target_hi[1:]),
        }
        if self.aux_size:
            item["aux_targets"] = torch.from_numpy(aux_targets[:L])
            item["aux_mask"] = torch.from_numpy(aux_mask[:L])
        if self.has_images:
            # Raw uint8 pixels: a quarter of float32's bytes through the loader; the model scales them.
            patches = np.zeros((L, 3, tok.PATCH_SIZE, tok.PATCH_SIZE), dtype=np.uint8)
            positions = np.zeros((L, 2), dtype=np.int64)
            for piece, pidx, dst in patch_src:
                keep = (pidx >= 0) & (dst < L)
                src, dst = pidx[keep], dst[keep]
                patches[dst] = piece.patches[src]
                positions[dst] = tok.patch_positions(piece.patch_intervals[src], rng if self.train else None)
            item["patches"] = torch.from_numpy(patches)
            item["patch_positions"] = torch.from_numpy(positions)
        return item


class MixedSpecWindows(ConcatDataset):
    """The windows of several `SequenceDataset`s (one per spec, same `seq_len`) as one dataset: a shuffled
    sampler then mixes specs within a batch. Where some spec has images, the windows of a spec without
    any get all-zero patches (no PATCH_TOKEN points at them), so every batch collates."""

    def __init__(self, parts: list[SequenceDataset]) -> None:
        lengths = {p.seq_len for p in parts}
        if len(lengths) != 1:
            raise ValueError(f"windows of one batch need one length, got {sorted(lengths)}")
        super().__init__(parts)
        self.parts = parts
        self.seq_len = lengths.pop()
        self.has_images = any(p.has_images for p in parts)

    def set_epoch(self, epoch: int) -> None:
        for part in self.parts:
            part.set_epoch(epoch)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = super().__getitem__(i)
        if self.has_images and "patches" not in item:
            item["patches"] = torch.zeros((self.seq_len, 3, tok.PATCH_SIZE, tok.PATCH_SIZE), dtype=torch.uint8)
            item["patch_positions"] = torch.zeros((self.seq_len, 2), dtype=torch.int64)
        return item
