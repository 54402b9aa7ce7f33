"""`alignpipe run --num-processes N`: the same command again under `accelerate launch`, N processes.

accelerate starts the processes (torchrun underneath) and each joins the process group (`distributed.init`).
Without an accelerate config file the launch is a single-node one with N local processes, on the GPUs when
there are any, else on the CPU (gloo); with `--accelerate-config FILE`, the file says how (FSDP, DeepSpeed,
several machines), and N, when given, overrides its process count.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from alignpipe import AlignpipeError
from alignpipe.config import Recipe
from alignpipe.distributed import DEEPSPEED_ERROR, free_port

OWN_OPTIONS = ("--num-processes", "--accelerate-config")


def strip_own_options(args: list[str]) -> list[str]:
    """The `run` arguments without the launch options (the launched processes must not launch again)."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        if arg in OWN_OPTIONS:
            skip = True
            continue
        if arg.startswith(tuple(f"{o}=" for o in OWN_OPTIONS)):
            continue
        out.append(arg)
    return out


def launch_command(num_processes: int, config: str | None, run_args: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config is not None:
        if not Path(config).is_file():
            raise AlignpipeError(f"--accelerate-config {config}: no such file (write one with `accelerate config "
                                 f"--config_file {config}`)")
        keys = _config_keys(config)
        if str(keys.get("distributed_type", "")).upper() == "DEEPSPEED":
            raise AlignpipeError(f"--accelerate-config {config}: {DEEPSPEED_ERROR}")
        cmd += ["--config_file", config]
        if str(keys.get("num_machines") or 1) == "1" and "main_process_port" not in keys:
            cmd += ["--main_process_port", str(free_port())]  # one machine: any free port, not a fixed one
        if num_processes > 1:
            cmd += ["--num_processes", str(num_processes)]
    else:  # one machine, N local processes; --multi_gpu is accelerate's torchrun launcher, which also runs on CPUs
        cmd += ["--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    return cmd + ["-m", "alignpipe", "run", *strip_own_options(run_args)]


def _config_keys(config: str) -> dict:
    try:
        keys = yaml.safe_load(Path(config).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise AlignpipeError(f"--accelerate-config {config}: not a readable YAML file ({exc})") from None
    return keys if isinstance(keys, dict) else {}


def check_processes(recipe: Recipe, n: int) -> None:
    """Several processes need work for each: a prompt per process in a round and a row per process in a batch."""
    syn, batch = recipe.synthesis, recipe.optimization.batch_size
    if n > syn.prompts_per_round:
        raise AlignpipeError(f"{n} processes for synthesis.prompts_per_round={syn.prompts_per_round}: more "
                             f"processes than prompts per round; use at most {syn.prompts_per_round} processes")
    if n > batch:
        raise AlignpipeError(f"{n} processes for optimization.batch_size={batch}: every process needs a row of "
                             f"each batch; use at most {batch} processes (the batch size is global, whatever the "
                             f"number of processes)")


def relaunch(num_processes: int, config: str | None, run_args: list[str]) -> int:
    """Run `alignpipe run RUN_ARGS` on N processes; returns the launcher's exit status."""
    return subprocess.call(launch_command(num_processes, config, run_args))
