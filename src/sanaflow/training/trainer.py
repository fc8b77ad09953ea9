"""One trainer for every loss: accelerate (DDP / FSDP), bf16 autocast, EMA, exact checkpoint/resume.

A checkpoint (``<output_dir>/checkpoints/step_NNNNNNN/``) holds everything a resumed run needs to
continue exactly as an uninterrupted one: the network (``model/``, diffusers layout), its EMA
(``ema/``), other trainable parts of the loss (``extra.safetensors``, e.g. a discriminator), the
optimizer and LR schedule (``optimizer.pt``), every rank's RNG states (``rng.pt``) and the step /
data position (``trainer_state.json``, with each rank's partial log window, so the first log record
after a resume averages the same steps). It is written to a temporary folder and renamed, so an
interrupted save never leaves a broken checkpoint behind; the temporary folder of a save that was
killed (SIGTERM, SIGKILL) is deleted by the next save.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..utils import atomic_path, atomic_write_text, dumps_json
from .config import TrainConfig, validate
from .data import make_loader
from .optim import EMA, build_optimizer, build_scheduler

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
METRICS_FILE = "metrics.jsonl"
_STEP_DIR = re.compile(r"^step_(\d+)$")
# What `atomic_path` leaves of a checkpoint save that was killed: ".step_NNNNNNN.<random>.tmp" (or ".old").
_STALE_DIR = re.compile(r"^\.step_\d+\.(\w+\.tmp|old)$")


@dataclass
class Task:
    """What the trainer needs from a task (see `sanaflow.training.tasks`)."""

    loss: nn.Module  # forward(batch) -> (loss, logs); loss.net is the trained network
    source: Any  # indexed data source with batch_indices(k)
    prepare: Callable[[dict, torch.device], dict]  # raw loader batch -> loss batch (frozen encoders)
    fingerprint: dict[str, Any]  # what must match for a checkpoint to be resumable
    evaluate: Callable[[nn.Module, int, Path], dict[str, float]] | None = None
    init_ema: dict[str, torch.Tensor] | None = None  # EMA weights to start from (model.init_from checkpoint)
    extras: dict[str, Any] = field(default_factory=dict)


def _rng_state() -> dict[str, Any]:
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[2] if random.getstate()[2] is not None else -1.0],
        "python_version": random.getstate()[0],
        "numpy": np.random.get_state()[1].tolist(),
        "numpy_pos": int(np.random.get_state()[2]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    gauss = state["python"][-1]
    random.setstate((state["python_version"], tuple(int(x) for x in state["python"][:-1]),
                     None if gauss == -1.0 else gauss))
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(output_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    a = list(a) if isinstance(a, tuple) else a
    b = list(b) if isinstance(b, tuple) else b
    return [] if a == b else [f"{prefix.rstrip('.')}: checkpoint {a!r} vs config {b!r}"]


_STATE_KEYS = ("step", "micro_step", "samples", "world_size")
# What a resumed run reads from a checkpoint folder besides trainer_state.json.
_CHECKPOINT_PARTS = {"model": "the network weights", "ema": "the EMA weights",
                     "optimizer.pt": "the optimizer and LR schedule", "rng.pt": "the RNG states"}


def _broken(path: Path, problem: str) -> CheckpointError:
    """The error for an unusable part of a checkpoint, saying how to go on."""
    ckpt = path if path.parent.name == CHECKPOINTS else path.parent
    return CheckpointError(
        f"{problem}; checkpoint {ckpt} cannot be resumed: delete that folder to resume from the checkpoint "
        "before it, or start a new run (without --resume) in another output_dir"
    )


def _saved_log_window(state: dict[str, Any], rank: int) -> tuple[int, dict[str, float]]:
    """Rank `rank`'s partial log window of a checkpoint: (steps since its last log record, summed logs).

    (0, {}) where the checkpoint has none (written at a log step, or by an older sanaflow).
    """
    try:
        window = state["log_windows"][rank]
        steps, sums = window["steps"], {str(k): float(v) for k, v in window["sums"].items()}
    except (KeyError, IndexError, TypeError, AttributeError, ValueError):
        return 0, {}
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        return 0, {}
    return steps, sums


def _metrics_step(line: str) -> int | None:
    """The step of a metrics.jsonl line; None for a blank line or one a killed run left half-written."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = record.get("step", 0) if isinstance(record, dict) else None
    return step if isinstance(step, int) else None


def _read_state(path: Path) -> dict[str, Any]:
    """A checkpoint's trainer_state.json, checked to hold the step / data position (no fingerprint check)."""
    file = path / STATE_FILE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _broken(path, f"cannot read {file}: {getattr(e, 'strerror', None) or e}") from None
    if not isinstance(state, dict):
        raise _broken(path, f"{file} is not a JSON object")
    bad = [k for k in _STATE_KEYS
           if not isinstance(state.get(k), int) or isinstance(state.get(k), bool) or state[k] < 0]
    if bad or state["world_size"] < 1:
        raise _broken(path, f"{file} lacks valid {', '.join(bad or ['world_size'])} "
                            f"(non-negative integers {', '.join(_STATE_KEYS)} are needed)")
    return state


def read_checkpoint_state(path: Path, fingerprint: dict[str, Any]) -> dict[str, Any]:
    """Read and check a checkpoint's trainer state against this run's fingerprint (architecture, task)."""
    state = _read_state(path)
    diffs = _diff(state.get("fingerprint"), json.loads(json.dumps(fingerprint)))
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was made by another architecture or task, so it cannot be resumed with this config: "
            + "; ".join(diffs[:6]) + (" ..." if len(diffs) > 6 else "")
        )
    return state


def check_output_dir(cfg: TrainConfig, resume: bool, read_files: bool = True) -> Path | None:
    """Check a run's output_dir before any model is built; return the checkpoint to resume (or None).

    Without `resume` the folder must hold no checkpoint (a run is never overwritten); with it, the
    latest checkpoint must be complete (every part a resumed run reads is there) and written with
    the same optimizer. `read_files` also opens its optimizer.pt (memory-mapped) and rng.pt to check
    them; `Trainer.fit`, which reads both in full before writing anything, skips that.
    """
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir {out} is a file, not a folder; choose another output_dir")
    ckpts = list_checkpoints(out)
    if not resume:
        if ckpts:
            raise ConfigError(
                f"{out} already holds checkpoints (latest {ckpts[-1].name}); pass --resume to continue "
                "that run, or choose another output_dir"
            )
        return None
    if not ckpts:
        raise CheckpointError(
            f"--resume: no checkpoint in {out / CHECKPOINTS} (a step_NNNNNNN folder with {STATE_FILE}); "
            "check output_dir, or leave out --resume to start a new run"
        )
    latest = ckpts[-1]
    for name, what in _CHECKPOINT_PARTS.items():
        if not (latest / name).exists():
            raise _broken(latest, f"{latest / name} ({what}) is missing")
    state = _read_state(latest)
    if read_files:
        _load_resume_files(latest, state["world_size"], mmap=True)
    saved = state.get("config", {}).get("optim", {}).get("name") if isinstance(state.get("config"), dict) else None
    if isinstance(saved, str) and saved != cfg.optim.name:
        raise CheckpointError(
            f"checkpoint {latest} was trained with optim.name {saved!r}, this config has {cfg.optim.name!r}; "
            f"resume with --set optim.name={saved}, or start a new run (without --resume) in another output_dir"
        )
    return latest


def _load_torch_file(path: Path, mmap: bool = False) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise _broken(path, f"{path} ({_CHECKPOINT_PARTS[path.name]}) is missing") from None
    except Exception as e:  # torch.load raises many types on a damaged file (KeyError, UnpicklingError, ...)
        raise _broken(path, f"{path} ({_CHECKPOINT_PARTS[path.name]}) is not a readable torch file "
                            f"(damaged, or not written by sanaflow: {type(e).__name__})") from None


def _one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def _load_resume_files(path: Path, world_size: int, mmap: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """optimizer.pt and rng.pt of a checkpoint, read and checked before anything is built or written.

    With `mmap` the tensors stay in the files (memory-mapped): a quick check of a large optimizer state.
    """
    opt = _load_torch_file(path / "optimizer.pt", mmap)
    if not (isinstance(opt, dict) and isinstance(opt.get("optimizer"), dict) and isinstance(opt.get("scheduler"), dict)
            and {"state", "param_groups"} <= set(opt["optimizer"])):
        raise _broken(path / "optimizer.pt", f"{path / 'optimizer.pt'} is not a sanaflow optimizer state "
                                             "(a dict of 'optimizer' and 'scheduler' state dicts)")
    rng = _load_torch_file(path / "rng.pt", mmap)
    if not isinstance(rng, list) or len(rng) != world_size:
        raise _broken(path / "rng.pt", f"{path / 'rng.pt'} does not hold the RNG states of {world_size} process(es)")
    # Apply each state once to prove it is well-formed, then put the current RNG states back exactly.
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    saved_cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        for state in rng:
            _set_rng_state(state)
    except Exception as e:  # KeyError, TypeError, ValueError, RuntimeError, ... on a damaged state
        raise _broken(path / "rng.pt", f"{path / 'rng.pt'} holds a damaged RNG state ({_one_line(e)})") from None
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])
        if saved_cuda is not None:
            torch.cuda.set_rng_state_all(saved_cuda)
    return opt, rng


class Trainer:
    """Runs a `Task` under a `TrainConfig`: the training loop, logging, evaluation and checkpoints."""

    def __init__(self, cfg: TrainConfig, task: Task):
        self.cfg = cfg
        self.task = task
        self.out = Path(cfg.output_dir)

    # ------------------------------------------------------------------------------ setup
    def _accelerator(self):
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs

        mp = self.cfg.train.mixed_precision
        # cpu=True on machines without CUDA: several processes (torchrun / accelerate launch) then
        # form a gloo group instead of each training alone.
        kwargs: dict[str, Any] = {"mixed_precision": "no" if mp == "fp32" else mp,
                                  "cpu": not torch.cuda.is_available()}
        if self.cfg.train.distributed == "fsdp":
            from accelerate import FullyShardedDataParallelPlugin

            kwargs["fsdp_plugin"] = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True)
        else:
            kwargs["kwargs_handlers"] = [DistributedDataParallelKwargs(broadcast_buffers=False)]
        return Accelerator(**kwargs)

    def _checkpoint_to_resume(self, resume: bool) -> tuple[Path | None, dict | None]:
        path = check_output_dir(self.cfg, resume, read_files=False)  # fit reads the files once, in full
        if path is None:
            return None, None
        return path, read_checkpoint_state(path, self.task.fingerprint)

    # ------------------------------------------------------------------------------ checkpoints
    def _net_state_files(self, path: Path) -> dict[str, dict[str, torch.Tensor]]:
        from ..hub import find_weight_files, load_state_dict_files

        out = {"model": load_state_dict_files(find_weight_files(path / "model")),
               "ema": load_state_dict_files(find_weight_files(path / "ema"))}
        extra = path / "extra.safetensors"
        out["extra"] = load_state_dict_files([extra]) if extra.is_file() else {}
        return out

    def _extra_state(self, loss: nn.Module) -> dict[str, torch.Tensor]:
        # Trainable parts of the loss other than the network (e.g. a discriminator).
        return {k: v.detach().cpu() for k, v in loss.state_dict().items()
                if not k.startswith("net.") and k not in ("null_hidden", "null_mask")}

    def save_checkpoint(self, acc, loss_unwrapped, ema, optimizer, scheduler, step, micro_step, samples,
                        log_window: dict[str, Any] | None = None) -> Path:
        """Write a complete checkpoint for `step` (collective: every rank must call it).

        `log_window`: this rank's logs since its last log record, ``{"steps": n, "sums": {name: float}}``.
        """
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        rng, windows = [_rng_state()], [log_window or {"steps": 0, "sums": {}}]
        if acc.num_processes > 1:
            gathered: list[Any] = [None] * acc.num_processes
            torch.distributed.all_gather_object(gathered, (rng[0], windows[0]))
            rng, windows = [g[0] for g in gathered], [g[1] for g in gathered]
        fsdp = self.cfg.train.distributed == "fsdp" and acc.num_processes > 1
        if fsdp:
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

            opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
            net_state = get_model_state_dict(loss_unwrapped.net, options=opts)
            opt_state = get_optimizer_state_dict(loss_unwrapped, optimizer.optimizer, options=opts)
        else:
            net_state = {k: v.detach().cpu() for k, v in loss_unwrapped.net.state_dict().items()}
            opt_state = optimizer.state_dict()
        path = self.out / CHECKPOINTS / f"step_{step:07d}"
        if acc.is_main_process:
            with atomic_path(path) as tmp:
                tmp.mkdir(parents=True)
                net = loss_unwrapped.net
                from ..hub import save_state_dict

                (tmp / "model").mkdir()
                save_state_dict(net_state, tmp / "model", net.weights_name, None)
                atomic_write_text(tmp / "model" / "config.json", json.dumps(
                    {"_class_name": net.diffusers_class_name, **net.config.to_dict()}, indent=2))
                ema.model.save_pretrained(tmp / "ema")
                extra = self._extra_state(loss_unwrapped)
                if extra:
                    from safetensors.torch import save_file

                    save_file(extra, str(tmp / "extra.safetensors"))
                torch.save({"optimizer": opt_state, "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
                torch.save(rng, tmp / "rng.pt")
                state = {"step": step, "micro_step": micro_step, "samples": samples,
                         "world_size": acc.num_processes, "fingerprint": self.task.fingerprint,
                         "config": self.cfg.to_dict(), "log_windows": windows}
                (tmp / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
            for old in list_checkpoints(self.out)[: -max(1, self.cfg.train.keep_checkpoints)]:
                shutil.rmtree(old, ignore_errors=True)
            for stale in (self.out / CHECKPOINTS).iterdir():  # temporary folders of saves that were killed
                if _STALE_DIR.match(stale.name) and stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
        acc.wait_for_everyone()
        return path

    # ------------------------------------------------------------------------------ logging
    def _log(self, acc, writer, record: dict[str, Any]) -> None:
        if not acc.is_main_process:
            return
        with open(self.out / METRICS_FILE, "a", encoding="utf-8") as f:
            f.write(dumps_json(record) + "\n")
        if writer is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float):
                    writer.add_scalar(k, v, record["step"])
            writer.flush()

    def _truncate_metrics(self, step: int) -> None:
        # A resumed run rewrites the steps after its checkpoint, and a new run (step 0) all of them:
        # drop their old records (and a line that a killed run left half-written).
        path = self.out / METRICS_FILE
        if not path.is_file():
            return
        keep = [line for line in path.read_text(encoding="utf-8").splitlines()
                if (n := _metrics_step(line)) is not None and n <= step]
        atomic_write_text(path, "".join(line + "\n" for line in keep))

    # ------------------------------------------------------------------------------ the loop
    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train until train.max_steps (or train.max_minutes); return a summary."""
        cfg, task = self.cfg, self.task
        t_start = time.time()
        # Validate everything that can fail before writing anything.
        validate(cfg)
        ckpt_path, ckpt_state = self._checkpoint_to_resume(resume)
        opt_state = rng_states = None
        if ckpt_path is not None:
            opt_state, rng_states = _load_resume_files(ckpt_path, ckpt_state["world_size"])
        loaded = self._net_state_files(ckpt_path) if ckpt_path is not None else None
        if loaded is not None:
            # Fails with a clear CheckpointError (missing / unexpected keys, shapes) on another architecture.
            task.loss.net.load_weights(loaded["model"], source=str(ckpt_path / "model"))
        acc = self._accelerator()
        if ckpt_state is not None and ckpt_state["world_size"] != acc.num_processes:
            raise CheckpointError(
                f"checkpoint {ckpt_path} was written by {ckpt_state['world_size']} process(es); this run has "
                f"{acc.num_processes}. Resume with the same number of processes (the data order depends on it)"
            )
        device = acc.device
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls (EMA eval, frozen parts) on tensor cores
            torch.backends.cudnn.allow_tf32 = True
            torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest conv kernels
        loss = task.loss
        net = loss.net
        if cfg.train.gradient_checkpointing:
            net.enable_gradient_checkpointing()
        ema = EMA(net, cfg.train.ema_decay)
        if loaded is None and task.init_ema is not None:
            ema.model.load_weights(task.init_ema, dtype=torch.float32, source=str(cfg.model.init_from))
        if loaded is not None:
            ema.model.load_weights(loaded["ema"], dtype=torch.float32, source=str(ckpt_path / "ema"))
            if loaded["extra"]:
                missing, unexpected = loss.load_state_dict({**loaded["extra"], **{
                    k: v for k, v in loss.state_dict().items() if k.startswith("net.") or k.startswith("null_")}},
                    strict=False)
                if missing or unexpected:
                    raise CheckpointError(f"{ckpt_path}/extra.safetensors does not match the loss: "
                                          f"missing {missing[:4]}, unexpected {unexpected[:4]}")
        ema.model.to(device)
        loss.to(device)
        if cfg.train.compile:
            # In place (Module.compile), so state_dict keys, the EMA copy and checkpoints are unchanged.
            net.compile(fullgraph=True, dynamic=False)
        # Fused AdamW: one kernel for all parameters instead of a dozen foreach launches per step.
        fused = device.type == "cuda" and cfg.train.distributed != "fsdp"
        optimizer = build_optimizer(loss.parameters(), cfg.optim, fused=fused)
        scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.max_steps)
        loss, optimizer = acc.prepare(loss, optimizer)
        loss_unwrapped = acc.unwrap_model(loss)

        step, micro_step, samples = 0, 0, 0
        if ckpt_state is not None:
            opt = opt_state
            try:
                if cfg.train.distributed == "fsdp" and acc.num_processes > 1:
                    from torch.distributed.checkpoint.state_dict import (
                        StateDictOptions,
                        set_optimizer_state_dict,
                    )

                    set_optimizer_state_dict(loss_unwrapped, optimizer.optimizer, opt["optimizer"],
                                             options=StateDictOptions(full_state_dict=True))
                else:
                    optimizer.load_state_dict(opt["optimizer"])
                scheduler.load_state_dict(opt["scheduler"])
            except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
                raise CheckpointError(
                    f"{ckpt_path / 'optimizer.pt'} does not match this run's optimizer (optim.name "
                    f"{cfg.optim.name!r}): {_one_line(e)}; resume with the optimizer settings the checkpoint was "
                    "written with, or start a new run (without --resume) in another output_dir"
                ) from None
            step, micro_step, samples = ckpt_state["step"], ckpt_state["micro_step"], ckpt_state["samples"]
        else:
            seed_everything(cfg.seed + acc.process_index)

        writer = None
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            import yaml

            atomic_write_text(self.out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            self._truncate_metrics(step)
            try:
                from torch.utils.tensorboard import SummaryWriter

                # purge_step: TensorBoard drops the events of earlier runs here from step + 1 on, as above.
                writer = SummaryWriter(str(self.out / "tensorboard"), purge_step=step + 1)
            except ImportError:
                acc.print("tensorboard is not installed: scalars go to metrics.jsonl only")
        if rng_states is not None:
            _set_rng_state(rng_states[acc.process_index])

        loader = make_loader(task.source, micro_step, acc.process_index, acc.num_processes, cfg.data.num_workers)
        next_batch = self._batches(acc, iter(loader), micro_step)
        accum = cfg.train.grad_accum
        # train.batch_size is per process: with N processes each step trains on N x batch_size x grad_accum
        # samples, rank r taking micro-batch k * N + r of the stream (data.py), so the union of the ranks'
        # batches is what one process with an N times larger batch would see (tested).
        batch_global = cfg.train.batch_size * accum * acc.num_processes
        acc.print(f"global batch {batch_global} = {acc.num_processes} process(es) x batch {cfg.train.batch_size}"
                  f" x grad_accum {accum}")
        pbar = None
        if cfg.train.progress and acc.is_main_process:
            from tqdm.auto import tqdm

            pbar = tqdm(total=cfg.train.max_steps, initial=step, unit="step", dynamic_ncols=True)
        loss.train()
        params = [p for p in loss.parameters() if p.requires_grad]
        has_step = "step" in dict(loss_unwrapped.named_buffers())
        window_t, window_n = time.time(), 0
        # name -> running sum (device tensor or float) over the window_steps steps since the last log
        # record; a resumed run continues the checkpoint's window, so its first record is the same.
        window_steps, logs_acc = (_saved_log_window(ckpt_state, acc.process_index)
                                  if ckpt_state is not None else (0, {}))
        last_ckpt = step if ckpt_state is not None else -1

        def window() -> dict[str, Any]:  # this rank's partial log window, as a checkpoint keeps it
            return {"steps": window_steps, "sums": {k: float(v) for k, v in logs_acc.items()}}

        stop_reason = "max_steps"
        eval_scores: dict[str, float] = {}
        while step < cfg.train.max_steps:
            if has_step:
                loss_unwrapped.step.fill_(step)
            for i in range(accum):
                batch = next_batch()
                ctx = acc.no_sync(loss) if i < accum - 1 else contextlib.nullcontext()
                with ctx, acc.autocast():
                    value, logs = loss(batch)
                acc.backward(value / accum)
                # Summed on the device: float(v) here would wait for the GPU every step, and the
                # host could no longer queue the next step while the GPU runs this one.
                for k, v in logs.items():
                    v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
                    logs_acc[k] = logs_acc.get(k, 0.0) + v / accum
                micro_step += 1
            grad_norm = acc.clip_grad_norm_(params, cfg.optim.grad_clip) if cfg.optim.grad_clip > 0 else None
            optimizer.step()
            lr = scheduler.get_last_lr()[0]  # the rate this step used (after scheduler.step(): the next one's)
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            ema.update(loss_unwrapped.net, step)
            step += 1
            window_steps += 1
            samples += batch_global
            window_n += batch_global
            if pbar is not None:
                pbar.update(1)
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
                elapsed = time.time() - window_t
                record = {"step": step, "lr": lr, "samples": samples,
                          "img_per_s": window_n / max(elapsed, 1e-9)}
                logs_acc = {k: float(v) for k, v in logs_acc.items()}  # the one host sync per log window
                if logs_acc and acc.num_processes > 1:  # log the mean over all ranks, not rank 0's share
                    keys = sorted(logs_acc)
                    mean = acc.reduce(torch.tensor([logs_acc[k] for k in keys], device=device), reduction="mean")
                    logs_acc = dict(zip(keys, mean.tolist()))
                record.update({k: v / window_steps for k, v in logs_acc.items()})
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                self._log(acc, writer, record)
                if pbar is not None:
                    pbar.set_postfix(loss=f"{record.get('loss', float('nan')):.4f}", img_s=f"{record['img_per_s']:.1f}")
                else:
                    acc.print(dumps_json({k: round(v, 5) if isinstance(v, float) else v for k, v in record.items()}))
                logs_acc, window_steps, window_t, window_n = {}, 0, time.time(), 0
            out_of_time = cfg.train.max_minutes is not None and (time.time() - t_start) / 60 > cfg.train.max_minutes
            if acc.num_processes > 1 and cfg.train.max_minutes is not None:
                # The ranks must stop at the same step, but agreeing waits for the GPU (a host sync that
                # would stop the host from queueing the next step): agree only on log steps, which sync anyway.
                if step % cfg.train.log_every == 0:
                    flag = torch.tensor(float(out_of_time), device=device)
                    out_of_time = bool(acc.reduce(flag, reduction="sum").item() > 0)
                else:
                    out_of_time = False
            if step % cfg.train.checkpoint_every == 0 or out_of_time or step == cfg.train.max_steps:
                self.save_checkpoint(acc, loss_unwrapped, ema, optimizer, scheduler, step, micro_step, samples,
                                     window())
                last_ckpt = step
            if task.evaluate is not None and cfg.eval.every and step % cfg.eval.every == 0 and step < cfg.train.max_steps:
                eval_scores = self._evaluate(acc, writer, ema, step)
            if out_of_time:
                stop_reason = "max_minutes"
                break
        if last_ckpt != step:
            self.save_checkpoint(acc, loss_unwrapped, ema, optimizer, scheduler, step, micro_step, samples,
                                 window())
        if pbar is not None:
            pbar.close()
        if task.evaluate is not None and cfg.eval.at_end and stop_reason == "max_steps":
            eval_scores = self._evaluate(acc, writer, ema, step)
        if writer is not None:
            writer.close()
        acc.wait_for_everyone()
        return {"step": step, "samples": samples, "stopped": stop_reason, "minutes": (time.time() - t_start) / 60,
                "eval": eval_scores, "checkpoint": str(self.out / CHECKPOINTS / f"step_{step:07d}")}

    def _batches(self, acc, data, micro_step: int) -> Callable[[], dict]:
        """The loss batches of the run: prepared stream batches, or draws from a sample pool (data.pool_size)."""
        cfg, task, device = self.cfg, self.task, acc.device
        if not cfg.data.pool_size:
            return lambda: task.prepare(next(data), device)
        from .cache import SamplePool

        t0 = time.time()
        chunk = cfg.train.batch_size // cfg.data.reuse
        pool = SamplePool(lambda: task.prepare(next(data), device), cfg.data.pool_size, chunk,
                          cfg.train.batch_size, start=micro_step)
        acc.print(f"sample pool: {cfg.data.pool_size} samples ({pool.num_chunks} chunks of {chunk}) "
                  f"filled in {time.time() - t0:.1f} s; each used ~{cfg.data.reuse} times")
        return pool.next_batch

    def _evaluate(self, acc, writer, ema: EMA, step: int) -> dict[str, float]:
        scores: dict[str, float] = {}
        if acc.is_main_process:
            scores = self.task.evaluate(ema.model, step, self.out)
            self._log(acc, writer, {"step": step, **scores})
            acc.print(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))
        acc.wait_for_everyone()
        return scores
