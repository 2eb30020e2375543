"""Train a CLIP-family model.

    python train.py --config experiments/demo_shapes.yaml [key=value ...]
    deepspeed --num_gpus 8 train.py --ds_config ds_configs/zero2.json --config experiments/X.yaml [key=value ...]

Resuming a ZeRO run on a different number of GPUs (or ZeRO stage) needs a one-time conversion first:
    python -m declip_ds.train.universal RUN_DIR    # writes <tag>_universal next to the newest tag
then the same command at the new size resumes from it (--resume auto). Without it, the run stops
before training and prints that command.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="experiment YAML (see experiments/)")
    p.add_argument("--ds_config", default=None, help="DeepSpeed JSON (see ds_configs/); default: ZeRO 0")
    p.add_argument("--resume", default="auto",
                   help="auto (newest complete checkpoint in train.output_dir, else start fresh; at another "
                        "world size or ZeRO stage its <tag>_universal conversion), none, or a path (a run dir, "
                        "its checkpoints dir, a tag dir or a <tag>_universal dir)")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by the deepspeed launcher
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 method.name=declip")
    return p.parse_intermixed_args(argv)  # overrides may come before or after the flags


def _own_message(e: Exception) -> str:
    """An error raised in a DataLoader worker reaches the trainer as "Caught X in DataLoader worker process N."
    plus the worker's traceback: keep the message it was raised with."""
    text = str(e)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    return last.split(": ", 1)[1] if last.startswith(type(e).__module__) and ": " in last else last


def main(argv=None) -> int:
    args = parse_args(argv)
    from declip_ds.config import ConfigError, load_config
    from declip_ds.data.wds import DataError
    from declip_ds.train.checkpoint import CheckpointError
    from declip_ds.train.guard import BadStepsError

    try:
        exp = load_config(args.config, args.overrides)
        from declip_ds.train.engine import PREEMPTED_EXIT_CODE, train

        result = train(exp, ds_config=args.ds_config, resume=args.resume)
        _leave_process_group()
    except (ConfigError, CheckpointError, DataError, FileNotFoundError) as e:
        print(f"error: {_own_message(e)}", file=sys.stderr)
        return 2
    except BadStepsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except Exception:  # noqa: BLE001
        # printed here rather than left to the interpreter, which would keep the trainer's frames alive to the end
        import traceback

        traceback.print_exc()
        return 1
    finally:
        _stop_loader_workers()
    return PREEMPTED_EXIT_CODE if result["preempted"] else 0


def _leave_process_group() -> None:
    """After a run that ended normally here: destroy the process group, which lets this rank's last
    collectives finish (NCCL warns at exit otherwise). No barrier: a rank that failed after the last
    collective (rank 0 alone writes the final evaluation's files) would keep the others waiting in it for the
    process-group timeout. Not after an error: another rank may still be inside a collective."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _stop_loader_workers() -> None:
    """DataLoader workers still running when the trainer returns (after an error: the loader's shutdown
    does not always reach them) are killed: at the interpreter's exit multiprocessing would SIGTERM them,
    which they outlive by 30 s so that a preemption checkpoint can be written (data/wds.py)."""
    import multiprocessing
    import signal

    children = multiprocessing.active_children()
    if children:  # torch's SIGCHLD handler would report the kill as a worker failure
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()
        child.join(5)


def _exit(code: int):
    """End the process with ``code``. After an error the process group is still alive (``_leave_process_group``
    destroys it only after a normal end), and gloo's worker threads may still be releasing the last collective's
    tensors: if that happens while the interpreter shuts down, the thread's call for the GIL aborts the process
    ("terminate called without an active exception", SIGABRT instead of ``code``; pytorch/pytorch#190489). So
    then the process leaves without the interpreter's shutdown, once its output is flushed (engine.train has
    closed the run's TensorBoard and W&B logs by then)."""
    dist = sys.modules.get("torch.distributed")  # not imported: no group (and Ctrl-C mid-import must not import it)
    alive = getattr(dist, "is_initialized", None)  # None also for a module whose import Ctrl-C cut short
    if alive is not None and dist.is_available() and alive():
        import logging
        import os

        wandb = sys.modules.get("wandb")
        try:  # a W&B run the trainer does not own (DeepSpeed's monitor: "wandb" in --ds_config) would end unfinished
            if wandb is not None and getattr(wandb, "run", None) is not None:
                wandb.finish(exit_code=code)
        except Exception as e:  # noqa: BLE001
            print(f"warning: could not finish the W&B run: {type(e).__name__}: {e}", file=sys.stderr)
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):  # a closed or broken pipe: the exit code still counts
                pass
        os._exit(code)
    sys.exit(code)


def _run() -> int:
    """``main()``'s exit code; Ctrl-C (130) and a SystemExit leave through ``_exit`` too, with the group alive."""
    try:
        return main()
    except KeyboardInterrupt:
        import traceback

        traceback.print_exc()
        return 130
    except SystemExit as e:  # sys.exit(code) or sys.exit("message") below main()
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1


if __name__ == "__main__":
    _exit(_run())
