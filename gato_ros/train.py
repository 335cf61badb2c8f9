"""`gato-ros train`: supervised training of a Gato model on an episode dataset (action loss only).

One script for one CPU, one GPU or many: under `torchrun --nproc_per_node N` it runs DDP (gloo on
CPU, nccl on GPU), each rank reading its share of the windows; rank 0 logs and writes checkpoints.

    gato-ros train --data data/stack --preset tiny --out runs/tiny --steps 2000
    torchrun --nproc_per_node 2 --standalone -m gato_ros.train --data data/stack --out runs/tiny --epochs 10

The output directory is the checkpoint (never pickle): model.safetensors, config.json (GatoConfig),
spec.json (EmbodimentSpec of the default arm), served.json (every arm's spec and the task names),
optimizer.safetensors + train_state.json (for --resume), log.jsonl.

`--data` may hold datasets of several specs, one per arm (a generalist, as Gato trains one network on many
bodies): each spec's windows are tokenized with that spec and a batch mixes them (gato_ros.sequences). The
first dataset's arm is the default. Datasets of one spec train exactly as before.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from gato_ros import contract, instructions
from gato_ros import tokenizer as tok
from gato_ros.data import DatasetError, EpisodeCollection, read_spec_groups
from gato_ros.model import GatoConfig, GatoModel
from gato_ros.sequences import MixedSpecWindows, SequenceDataset
from gato_ros.spec import EmbodimentSpec

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "train_state.json"
LOG_FILE = "log.jsonl"
SERVED_FILE = "served.json"  # {"specs": {arm: spec JSON object}, "tasks": [name, ...]}: what an export serves


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing files or its files disagree."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, nargs="+", help="dataset directories (gato-ros collect); several "
                        "specs train one generalist (one spec per arm, the first dataset's arm is the default)")
    parser.add_argument("--init", default=None, help="start from this checkpoint's weights (fine-tuning; a fresh "
                        "optimizer and schedule)")
    parser.add_argument("--out", required=True, help="checkpoint/output directory")
    parser.add_argument("--preset", default="tiny", help="model preset (tiny, gato-79m, gato-364m, gato-1.18b)")
    parser.add_argument("--context-window", type=int, default=None, help="attention window in tokens")
    parser.add_argument("--seq-len", type=int, default=None, help="training window in tokens (default: context)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (overrides --epochs)")
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the training windows")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch (split across ranks)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor as a share of --lr")
    parser.add_argument("--warmup", type=int, default=200, help="warmup steps (at most a fifth of the run)")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--label-sigma", type=float, default=None, help="soft-label width in bins (0: hard)")
    parser.add_argument("--no-value-embedding", action="store_true", help="plain lookup for continuous tokens")
    parser.add_argument("--stride-steps", type=int, default=1, help="timesteps between window starts")
    parser.add_argument("--aux-key", default=None, help="train an auxiliary head to predict this auxiliary key of the "
                        "data (collect --aux-keys) from each timestep's separator; training only, never exported")
    parser.add_argument("--aux-weight", type=float, default=1.0, help="weight of the auxiliary error (squared, linear "
                        "beyond --aux-huber)")
    parser.add_argument("--aux-huber", type=float, default=0.1, help="aux errors beyond this many normalization "
                        "scales count linearly (Huber), so far-off states cannot swamp the action loss; 0: squared")
    parser.add_argument("--discrete-weight", type=float, default=None, help="weight of the discrete action tokens' "
                        "loss (the gripper's) beside the continuous ones' (default: the model's, 1 for a new one)")
    parser.add_argument("--prompt-prob", type=float, default=0.0, help="share of windows with a prompt")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="prompt length (default seq-len/4)")
    parser.add_argument("--prompt-steps", type=int, default=0, help="Gato prompting as the runtime serves it: prompts "
                        "of this many timesteps, pinned at the context's start (the episode's tokens keep their offset "
                        "after it); the file then declares it (gato_ros.conditioning). 0: off")
    parser.add_argument("--pinned-span", type=int, default=None, help="reserve this many positions at the context's "
                        "start for the pinned prompt/instruction, seen from every later token whatever "
                        "--context-window (which then stays the episode's own reach); 0: the prefix must lie within "
                        "the reach")
    parser.add_argument("--step-local-attention", action="store_true", help="each query sees only its own "
                        "timestep (and a pinned prefix): the policy cannot copy the previous timestep's actions")
    parser.add_argument("--instruction-prob", type=float, default=0.0, help="share of windows that start with their "
                        "episode's instruction text (its `instruction` metadata), pinned as a prompt is")
    parser.add_argument("--val-fraction", type=float, default=0.05, help="held-out share of episodes")
    parser.add_argument("--val-batches", type=int, default=20, help="batches per validation")
    parser.add_argument("--eval-every", type=int, default=500, help="steps between validations and saves")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop (and save) after this wall time")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    parser.add_argument("--stop-at", type=int, default=None, help="save and stop at this step, keeping the schedule "
                        "of the whole run (resume later); for DAgger rounds from mid-run checkpoints")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes per rank")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per rank")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")


# ----------------------------------------------------------------------------------------------
# Checkpoints: safetensors for tensors, JSON for everything else


def _atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def save_checkpoint(out: Path, model: GatoModel, spec: EmbodimentSpec, optimizer: torch.optim.Optimizer | None,
                    state: dict[str, Any], served: contract.Served | None = None) -> None:
    """Write the checkpoint; train_state.json goes last and names the step every file holds. `served`: every
    arm's spec and the tasks (served.json; its default arm's spec is `spec`)."""
    out.mkdir(parents=True, exist_ok=True)
    meta = {"step": str(state["step"])}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    _atomic(out / MODEL_FILE, lambda p: save_file(tensors, str(p), metadata=meta))
    _atomic(out / "config.json", lambda p: p.write_text(json.dumps(model.config.to_dict(), indent=2)))
    _atomic(out / "spec.json", lambda p: p.write_text(spec.to_json()))
    if served is not None:
        raw: dict[str, Any] = {"specs": served.specs, "tasks": list(served.tasks)}
        if served.conditioning is not None:
            raw["conditioning"] = json.loads(served.conditioning.to_json())
        if served.pairs is not None:
            raw["pairs"] = {arm: list(tasks) for arm, tasks in served.pairs.items()}
        text = json.dumps(raw, indent=2)
        _atomic(out / SERVED_FILE, lambda p: p.write_text(text))
    if optimizer is not None:
        opt_tensors, opt_json = _flatten_optimizer(optimizer)
        _atomic(out / OPTIMIZER_FILE, lambda p: save_file(opt_tensors, str(p), metadata=meta))
        state = {**state, "optimizer": opt_json}
    _atomic(out / STATE_FILE, lambda p: p.write_text(json.dumps(state, indent=2)))


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in sd["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], raw: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for idx, entry in raw["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in raw["param_groups"]]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def load_checkpoint(directory: str | Path, device: str | torch.device = "cpu") -> tuple[GatoModel, GatoConfig,
                                                                                         EmbodimentSpec]:
    """(model in eval mode, its GatoConfig, the EmbodimentSpec it was trained on)."""
    directory = Path(directory)
    for name in (MODEL_FILE, "config.json", "spec.json"):
        if not (directory / name).exists():
            raise CheckpointError(f"{directory / name}: missing; not a gato_ros checkpoint")
    config = GatoConfig.from_json((directory / "config.json").read_text())
    spec = EmbodimentSpec.from_json((directory / "spec.json").read_text())
    model = GatoModel(config)
    try:
        tensors = load_file(str(directory / MODEL_FILE))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{directory / MODEL_FILE}: unreadable or truncated ({err})") from err
    try:
        model.load_state_dict(tensors)
    except RuntimeError as err:
        raise CheckpointError(f"{directory / MODEL_FILE}: does not match config.json ({err})") from err
    return model.to(device).eval(), config, spec


def load_served(directory: str | Path) -> contract.Served | None:
    """The arms (each with its spec) and tasks a checkpoint was trained on (served.json; None for a checkpoint
    written before it, which knows its spec.json only)."""
    path = Path(directory) / SERVED_FILE
    if not path.exists():
        return None
    try:
        raw = json.loads(path.read_text())
        conditioning, pairs = raw.get("conditioning"), raw.get("pairs")
        served = contract.Served(specs=dict(raw["specs"]), tasks=tuple(raw["tasks"]),
                                 conditioning=None if conditioning is None
                                 else contract.Conditioning.from_json(json.dumps(conditioning)),
                                 pairs=None if pairs is None else {arm: tuple(t) for arm, t in pairs.items()})
        served_specs(served)  # every spec must read back
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{path}: unreadable ({err})") from err
    if not served.specs or not served.tasks:
        raise CheckpointError(f"{path}: names no arm or no task")
    return served


def served_specs(served: contract.Served) -> dict[str, EmbodimentSpec]:
    """Arm name -> EmbodimentSpec, in the file's order (the first is the default)."""
    return {arm: EmbodimentSpec.from_json(json.dumps(raw)) for arm, raw in served.specs.items()}


def served_by(groups: list[EpisodeCollection], conditioning: contract.Conditioning | None = None) -> contract.Served:
    """What a model trained on `groups` serves: each group's arm with its spec, the tasks of every episode, the
    tasks of each arm's own episodes (the pairs it was trained on), and how a task is selected when it was trained
    with prompts or instructions."""
    tasks = dict.fromkeys(t for g in groups for t in g.tasks)
    return contract.Served(specs={g.arm: json.loads(g.spec.to_json()) for g in groups}, tasks=tuple(tasks),
                           conditioning=conditioning, pairs={g.arm: tuple(g.tasks) for g in groups})


def choose_conditioning(args: argparse.Namespace, groups: list[EpisodeCollection], source: Path | None
                        ) -> contract.Conditioning | None:
    """How this run conditions on the task (None: not pinned, as before). Instructions come from the episodes'
    metadata; the instruction model is trained on them, or kept from the checkpoint this run continues when
    it reads every text (token ids must not change under a fine-tune)."""
    if args.prompt_steps <= 0 and args.instruction_prob <= 0:
        return None
    if args.instruction_prob <= 0:
        return contract.Conditioning(prompt_steps=args.prompt_steps)
    texts: dict[str, str] = {}
    for group in groups:
        for task, text in group.instructions.items():
            if texts.setdefault(task, text) != text:
                raise SetupError(f"task {task!r} has two instructions across datasets: {texts[task]!r}, {text!r}")
    lacking = [t for g in groups for t in g.tasks if t not in texts]
    if lacking:
        raise SetupError(f"--instruction-prob: episodes of task(s) {sorted(set(lacking))} carry no instruction")
    recorded = load_served(source) if source is not None else None
    model = ""
    if recorded is not None and recorded.conditioning is not None and recorded.conditioning.instruction_model:
        model = recorded.conditioning.instruction_model
        try:
            reader = instructions.InstructionTokenizer.from_base64(model)
            for text in texts.values():
                reader.encode(text)
        except instructions.InstructionError:
            model = ""
    if not model:
        model = instructions.InstructionTokenizer(instructions.train_instruction_model(texts.values())).to_base64()
    return contract.Conditioning(prompt_steps=max(0, args.prompt_steps), instructions=texts, instruction_model=model)


# ----------------------------------------------------------------------------------------------
# Training


class ActionLoss(torch.nn.Module):
    """DDP syncs gradients of what runs through `forward`, so the loss lives in one."""

    def __init__(self, model: GatoModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model.action_loss(**batch)


def lr_at(step: int, total: int, warmup: int, lr: float, min_ratio: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_optimizer(model: GatoModel, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW, betas (0.9, 0.95); decay on matrices and embeddings only (nanoGPT), not biases or norms."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def split_episodes(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Held-out episodes for validation: a seeded choice, at least one when fraction > 0 and n > 1."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = 0 if fraction <= 0 or n < 2 else min(n - 1, max(1, round(n * fraction)))
    return sorted(order[n_val:].tolist()), sorted(order[:n_val].tolist())


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: GatoModel, loader: DataLoader, device: torch.device, max_batches: int, autocast: Any) -> float:
    model.eval()
    total, count = 0.0, 0
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        batch = to_device(batch, device)
        batch = {k: v for k, v in batch.items() if not k.startswith("aux_")}  # the action loss alone: comparable
        with autocast():
            loss = model.action_loss(**batch)
        n = int(batch["loss_mask"].sum())
        total += float(loss) * n
        count += n
    model.train()
    return total / max(count, 1)


def run(args: argparse.Namespace) -> int:
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    master = rank == 0
    try:
        return _train(args, rank, world, device, master, distributed)
    finally:
        if distributed:
            dist.destroy_process_group()


class SetupError(Exception):
    """The run cannot start as asked; the message says why (the command exits with 2)."""


@dataclass
class Run:
    """Everything one rank's training loop uses, set up by `prepare_run`."""

    args: argparse.Namespace
    world: int
    device: torch.device
    master: bool
    distributed: bool
    out: Path
    spec: EmbodimentSpec  # the default arm's
    served: contract.Served  # every arm's spec and the tasks
    seq_len: int
    train_set: SequenceDataset | MixedSpecWindows
    val_loader: DataLoader | None
    sampler: DistributedSampler
    per_rank: int
    steps_per_epoch: int
    total_steps: int
    warmup: int
    model: GatoModel
    optimizer: torch.optim.Optimizer
    wrapped: torch.nn.Module
    autocast: Any
    step: int = 0
    best_val: float = float("inf")


@dataclass
class Window:
    """Training metrics since the last log line."""

    started: float = field(default_factory=time.time)
    tokens: int = 0
    loss: float = 0.0
    steps: int = 0


def _train(args: argparse.Namespace, rank: int, world: int, device: torch.device, master: bool,
           distributed: bool) -> int:
    try:
        run = prepare_run(args, rank, world, device, master, distributed)
    except SetupError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    train_loop(run)
    if master:
        print(f"gato-ros train: step {run.step}, checkpoint in {run.out}", file=sys.stderr)
    return 0


def check_output(args: argparse.Namespace, world: int) -> bool:
    """Whether this run resumes the checkpoint in --out; refuses to overwrite one or split a batch unevenly."""
    out = Path(args.out)
    if not args.resume and (out / STATE_FILE).exists():
        raise SetupError(f"{out} already holds a checkpoint; pass --resume to continue it")
    if args.batch_size % world:
        raise SetupError(f"--batch-size {args.batch_size} is not divisible by {world} ranks")
    return args.resume and (out / STATE_FILE).exists()


def choose_config(args: argparse.Namespace, specs: list[EmbodimentSpec], resuming: bool) -> GatoConfig:
    """The checkpoint's config when resuming or fine-tuning (every spec of the data must be one it was trained
    on), else the preset's. Each spec's timestep must fit the model's local positions."""
    if resuming or args.init:
        source = Path(args.out) if resuming else Path(args.init)
        served = load_served(source)
        known = (list(served_specs(served).values()) if served is not None
                 else [EmbodimentSpec.from_json((source / "spec.json").read_text())])
        for spec in specs:  # a fine-tune may add a body (Gato fine-tunes to new embodiments); a resumed run may not
            if spec not in known and resuming:
                raise SetupError(f"{source} was trained on other specs than {' '.join(args.data)} ({spec.name!r})")
        config = GatoConfig.from_json((source / "config.json").read_text())
        if args.init and not resuming and args.context_window is not None:
            config = replace(config, context_window=args.context_window)  # the attention reach may change
        if args.init and not resuming and args.pinned_span is not None:
            config = replace(config, pinned_span=args.pinned_span)
        if args.init and not resuming and args.step_local_attention:
            if config.observation_local_positions_only:
                raise SetupError(f"{source}: --step-local-attention needs a local position on every token, and this "
                                 "checkpoint gives observation tokens only; train from a preset with the flag instead")
            config = replace(config, step_local_attention=True)
    else:
        config = GatoConfig.from_preset(
            args.preset, context_window=args.context_window, label_sigma=args.label_sigma,
            value_embedding=False if args.no_value_embedding else None, pinned_span=args.pinned_span,
            step_local_attention=True if args.step_local_attention else None,
            observation_local_positions_only=False if args.step_local_attention else None,
        )
    for spec in specs:
        if tok.timestep_token_count(spec) > config.max_local_positions:
            raise SetupError(f"a timestep of spec {spec.name!r} has {tok.timestep_token_count(spec)} tokens, the "
                             f"model has {config.max_local_positions} local positions")
    return config


def with_aux_head(config: GatoConfig, args: argparse.Namespace, groups: list[EpisodeCollection]) -> GatoConfig:
    """The config with an aux head as wide as --aux-key's values (a fine-tune may add one to a model without).
    Every spec's data must carry the key with one width (each keeps its own normalization)."""
    if not args.aux_key:
        return config
    for data in groups:
        if args.aux_key not in data.aux:
            raise SetupError(f"--aux-key {args.aux_key!r}: the data of spec {data.spec.name!r} has auxiliary keys "
                             f"{sorted(data.aux)}")
    sizes = {data.aux[args.aux_key].size for data in groups}
    if len(sizes) != 1:
        raise SetupError(f"--aux-key {args.aux_key!r} has different widths {sorted(sizes)} across specs")
    size = sizes.pop()
    if config.aux_size not in (0, size):
        raise SetupError(f"the model's aux head predicts {config.aux_size} values, {args.aux_key!r} has {size}")
    return replace(config, aux_size=size, aux_weight=args.aux_weight, aux_huber=args.aux_huber)


Windows = SequenceDataset | MixedSpecWindows


def instruction_ids(conditioning: contract.Conditioning) -> dict[str, np.ndarray]:
    """Each task's instruction as the text token ids the file's instruction model reads it to ({}: no model)."""
    if not conditioning.instruction_model:
        return {}
    reader = instructions.instruction_tokenizer(conditioning)
    return {task: reader.encode(text) for task, text in conditioning.instructions.items()}


def check_reach(config: GatoConfig, groups: list[EpisodeCollection], conditioning: contract.Conditioning,
                seq_len: int) -> None:
    """A pinned prefix conditions the whole episode only while it is within the model's attention reach
    (config.context_window: a query sees keys fewer than that many positions back). The cache the runtime keeps
    is a separate number (the training window, `--seq-len`; set at export with --context-tokens). A model with
    a pinned span sees its prefix from anywhere: the prefix need only fit the span."""
    longest = max(int(e["length"]) * tok.timestep_token_count(g.spec) for g in groups for e in g.episodes)
    prefix = max([conditioning.prompt_steps * tok.timestep_token_count(g.spec) for g in groups]
                 + [len(ids) for ids in instruction_ids(conditioning).values()])
    if config.pinned_span:
        if prefix > config.pinned_span:
            raise SetupError(f"the longest prompt/instruction has {prefix} tokens, more than --pinned-span "
                             f"{config.pinned_span}")
        return
    if config.context_window < prefix + longest:
        raise SetupError(f"a pinned prompt/instruction must stay within the attention reach for a whole episode: "
                         f"--context-window {config.context_window} < {prefix + longest} tokens (prefix + the longest "
                         f"episode); pass a larger --context-window (e.g. {2 ** (prefix + longest).bit_length()}) "
                         f"with --seq-len {seq_len} for the window trained on")


def make_datasets(args: argparse.Namespace, groups: list[EpisodeCollection], config: GatoConfig, seq_len: int,
                  master: bool, conditioning: contract.Conditioning | None = None
                  ) -> tuple[Windows, Windows | None, int, int]:
    """Training windows and (on rank 0) validation windows over held-out episodes, with their episode counts.
    Each spec's episodes are split and tokenized on their own (so each spec has held-out episodes); one spec
    gives its SequenceDataset itself, several a MixedSpecWindows over them."""
    layout = {"observation_local_positions_only": config.observation_local_positions_only, "seed": args.seed,
              "aux_key": args.aux_key if config.aux_size else None, "pinned_span": config.pinned_span}
    prompt_prob, prompt_tokens = args.prompt_prob, args.prompt_tokens
    if conditioning is not None:
        layout.update(pin_prefix=True, instruction_prob=args.instruction_prob,
                      instructions=instruction_ids(conditioning) or None)
        if conditioning.prompt_steps <= 0:
            prompt_prob = 0.0
    train_sets, val_sets, n_train, n_val = [], [], 0, 0
    for data in groups:
        if conditioning is not None and conditioning.prompt_steps > 0:
            prompt_tokens = conditioning.prompt_steps * tok.timestep_token_count(data.spec)
        train_eps, val_eps = split_episodes(len(data), args.val_fraction, args.seed)
        train_sets.append(SequenceDataset(data, seq_len, train_eps, args.stride_steps, prompt_prob,
                                          prompt_tokens, train=True, **layout))
        val_stride = max(1, seq_len // tok.timestep_token_count(data.spec))
        if val_eps and master:
            val_sets.append(SequenceDataset(data, seq_len, val_eps, val_stride, prompt_prob, prompt_tokens,
                                            train=False, **layout))
        n_train, n_val = n_train + len(train_eps), n_val + len(val_eps)

    def joined(sets: list[SequenceDataset]) -> Windows | None:
        return None if not sets else sets[0] if len(sets) == 1 else MixedSpecWindows(sets)

    return joined(train_sets), joined(val_sets), n_train, n_val


def load_resume_state(run: Run) -> None:
    """Weights, optimizer, step and schedule from the checkpoint in --out; every file must hold the same step."""
    out = run.out
    state = json.loads((out / STATE_FILE).read_text())
    run.model.load_state_dict(load_file(str(out / MODEL_FILE)))
    for path in (out / MODEL_FILE, out / OPTIMIZER_FILE):
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("step") != str(state["step"]):
                raise CheckpointError(f"{path}: holds step {(f.metadata() or {}).get('step')}, "
                                      f"{out / STATE_FILE} says {state['step']} (interrupted save?)")
    _load_optimizer(run.optimizer, load_file(str(out / OPTIMIZER_FILE), device=str(run.device)), state["optimizer"])
    run.step, run.best_val = state["step"], state.get("best_val", float("inf"))
    run.total_steps = state.get("total_steps", run.total_steps) if run.args.steps is None else run.args.steps


def prepare_run(args: argparse.Namespace, rank: int, world: int, device: torch.device, master: bool,
                distributed: bool) -> Run:
    resuming = check_output(args, world)
    try:
        groups = read_spec_groups(args.data)
    except DatasetError as err:
        raise SetupError(str(err)) from err
    config = with_aux_head(choose_config(args, [g.spec for g in groups], resuming), args, groups)
    if args.discrete_weight is not None:
        config = replace(config, discrete_weight=args.discrete_weight)
    seq_len = args.seq_len or config.context_window
    torch.manual_seed(args.seed)
    source = Path(args.out) if resuming else Path(args.init) if args.init else None
    conditioning = choose_conditioning(args, groups, source)
    if conditioning is not None:
        check_reach(config, groups, conditioning, seq_len)
    train_set, val_set, n_train, n_val = make_datasets(args, groups, config, seq_len, master, conditioning)
    per_rank = args.batch_size // world
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True, seed=args.seed,
                                 drop_last=False)
    steps_per_epoch = max(1, len(sampler) // per_rank)
    total_steps = args.steps if args.steps is not None else max(1, math.ceil(args.epochs * steps_per_epoch))

    model = GatoModel(config).to(device)
    if args.init and not resuming:
        missing, unexpected = model.load_state_dict(load_file(str(Path(args.init) / MODEL_FILE)), strict=False)
        if unexpected or any(not k.startswith("aux_head.") for k in missing):  # only a new aux head may be missing
            raise SetupError(f"{args.init}: weights do not fit the model (missing {missing}, unexpected {unexpected})")
    run = Run(
        args=args, world=world, device=device, master=master, distributed=distributed, out=Path(args.out),
        spec=groups[0].spec, served=served_by(groups, conditioning), seq_len=seq_len, train_set=train_set,
        val_loader=(DataLoader(val_set, batch_size=per_rank, shuffle=False, num_workers=args.workers)
                    if val_set is not None else None),
        sampler=sampler, per_rank=per_rank, steps_per_epoch=steps_per_epoch, total_steps=total_steps,
        warmup=max(1, min(args.warmup, total_steps // 5)), model=model,
        optimizer=make_optimizer(model, args.lr, args.weight_decay, device), wrapped=ActionLoss(model),
        autocast=(lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext,
    )
    if resuming:
        load_resume_state(run)
    if distributed:  # after loading: DDP starts every rank from rank 0's weights
        run.wrapped = DistributedDataParallel(run.wrapped, device_ids=[device.index] if device.type == "cuda" else None,
                                              find_unused_parameters=not any(g.spec.image_keys for g in groups))
    if master:
        run.out.mkdir(parents=True, exist_ok=True)
        arms = ", ".join(f"{g.arm} ({g.spec.name}, {tok.timestep_token_count(g.spec)} tokens per timestep)"
                         for g in groups)
        print(f"gato-ros train: {model.num_params() / 1e6:.2f}M parameters, {len(train_set)} windows of {seq_len} "
              f"tokens from {n_train} episodes ({n_val} held out) of {arms}, {world} rank(s) on {device}, "
              f"{run.total_steps} steps from {run.step}", file=sys.stderr)
    return run


def save_run(run: Run) -> None:
    args = run.args
    save_checkpoint(run.out, run.model, run.spec, run.optimizer, {
        "step": run.step, "total_steps": run.total_steps, "best_val": run.best_val, "seed": args.seed,
        "seq_len": run.seq_len, "batch_size": args.batch_size, "data": [str(d) for d in args.data],
    }, run.served)


def optimizer_step(run: Run, batch: dict[str, torch.Tensor]) -> tuple[float, float]:
    """One step at the schedule's learning rate; returns (loss, lr)."""
    lr = lr_at(run.step, run.total_steps, run.warmup, run.args.lr, run.args.min_lr_ratio)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    with run.autocast():
        loss = run.wrapped(batch)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), run.args.grad_clip)
    run.optimizer.step()
    run.step += 1
    return loss.item(), lr


def should_stop(run: Run, start_time: float) -> bool:
    """At the last step, at --stop-at, or past --max-minutes (rank 0's clock decides, so every rank stops together)."""
    args = run.args
    stop = run.step >= run.total_steps or (args.stop_at is not None and run.step >= args.stop_at)
    if args.max_minutes is not None:
        flag = torch.tensor([float(time.time() - start_time > 60 * args.max_minutes)], device=run.device)
        if run.distributed:
            dist.broadcast(flag, 0)
        stop = stop or bool(flag.item())
    return stop


def checkpoint(run: Run, window: Window, lr: float, start_time: float, log: Any, progress: Any) -> None:
    """Rank 0: validate, save, and write one log line for the window since the last checkpoint."""
    now = time.time()
    record = {"step": run.step, "loss": window.loss / max(window.steps, 1), "lr": lr,
              "time": round(now - start_time, 3),
              "tokens_per_s": round(window.tokens / max(now - window.started, 1e-9), 1)}
    if run.val_loader is not None:
        record["val_loss"] = evaluate(run.model, run.val_loader, run.device, run.args.val_batches, run.autocast)
        run.best_val = min(run.best_val, record["val_loss"])
    save_run(run)
    log.write(json.dumps(record) + "\n")
    log.flush()
    if progress is not None:
        progress.write(json.dumps(record))


def epoch_loader(run: Run) -> DataLoader:
    """The current epoch's batches from the current step on (a resumed run skips what it already did)."""
    epoch, skip = divmod(run.step, run.steps_per_epoch)
    run.sampler.set_epoch(epoch)
    run.train_set.set_epoch(epoch)
    indices = list(run.sampler)
    size = run.per_rank
    batches = [indices[k : k + size] for k in range(0, run.steps_per_epoch * size, size)]
    return DataLoader(run.train_set, batch_sampler=batches[skip:], num_workers=run.args.workers,
                      pin_memory=run.device.type == "cuda")


def train_loop(run: Run) -> None:
    progress = None
    if run.master and not run.args.no_progress:
        from tqdm import tqdm

        progress = tqdm(total=run.total_steps, initial=run.step, desc="train", dynamic_ncols=True)
    log = (run.out / LOG_FILE).open("a") if run.master else None
    start_time, window = time.time(), Window()
    run.model.train()
    stop = False
    try:
        while run.step < run.total_steps and not stop:
            for batch in epoch_loader(run):
                batch = to_device(batch, run.device)
                loss, lr = optimizer_step(run, batch)
                window.loss, window.steps = window.loss + loss, window.steps + 1
                window.tokens += batch["input_ids"].numel() * run.world
                stop = should_stop(run, start_time)
                due = stop or run.step % run.args.eval_every == 0
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                if run.master and due:
                    checkpoint(run, window, lr, start_time, log, progress)
                    window = Window()
                if run.distributed and due:
                    dist.barrier()  # the others wait while rank 0 validates and saves
                if stop:
                    break
    finally:
        if progress is not None:
            progress.close()
        if log is not None:
            log.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gato_ros.train", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
