"""Process-group setup shared by `python train.py` (one process) and the `deepspeed` launcher."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_cpu_accelerator_if_no_gpu() -> None:
    """DeepSpeed picks its accelerator at import: make it the CPU one (gloo) on a machine without CUDA."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


# (rank, world size, local rank) variables of launchers that export no RANK / WORLD_SIZE: mpirun (Open MPI,
# MVAPICH2, MPICH / Intel MPI's hydra; also DeepSpeed's --launcher openmpi / mvapich / impi) and a Slurm job step
# (srun; SLURM_STEP_NUM_TASKS exists only inside a step, so `python train.py` in an sbatch script is one process)
LAUNCHER_VARS = (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
                 ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_RANK"),
                 ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
                 ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID"))


def launcher_ranks() -> tuple[int, int, int | None, str] | None:
    """(rank, world size, local rank, world-size variable) from an MPI or srun launch, or None. A launcher's
    variables count when all three are set; one that gives only rank and size (Slurm's pmi2 plugin sets
    PMI_RANK / PMI_SIZE under srun, not MPI_LOCALRANKID) gives way to the next, which has the local rank
    (SLURM_LOCALID); if none has it, the local rank is None."""
    env, partial = os.environ, None
    for rank_var, size_var, local_var in LAUNCHER_VARS:
        if rank_var in env and size_var in env:
            if local_var in env:
                return int(env[rank_var]), int(env[size_var]), int(env[local_var]), size_var
            partial = partial or (int(env[rank_var]), int(env[size_var]), None, size_var)
    return partial


def _under_launcher(found) -> bool:
    """``found`` (``launcher_ranks()``) is mpirun's or srun's launch of several ranks, with no torchrun / deepspeed
    launcher inside (``INNER_LAUNCHER_VARS``) that sets RANK / WORLD_SIZE / LOCAL_RANK itself."""
    return found is not None and found[1] > 1 and not any(v in os.environ for v in INNER_LAUNCHER_VARS)


def _adopts(found) -> bool:
    """Whether ``adopt_launcher_env`` takes mpirun's / srun's values: under such a launcher, unless RANK,
    WORLD_SIZE and LOCAL_RANK are all set. It depends on which variables are set, never on their values, so that
    every rank of a launch decides alike (and DeepSpeed's init would replace an incomplete set itself)."""
    return _under_launcher(found) and not all(v in os.environ for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def env_rank() -> tuple[int, int]:
    """(rank, world size) announced by the launcher (RANK / WORLD_SIZE, else mpirun's or srun's own variables,
    as ``adopt_launcher_env`` will take them), before any init; (0, 1) for a plain process."""
    found = launcher_ranks()
    if _adopts(found):
        return found[0], found[1]
    if "WORLD_SIZE" in os.environ:
        return int(os.environ.get("RANK", "0")), int(os.environ["WORLD_SIZE"])
    return (found[0], found[1]) if found else (0, 1)


def env_world_size() -> int:
    """World size announced by the launcher (1 for a plain ``python train.py``), before any init."""
    return env_rank()[1]


def _is_loopback(address: str) -> bool:
    """localhost, 127.0.0.0/8 (Debian's 127.0.1.1 for the host's own name included), ::1 or 0.0.0.0."""
    import ipaddress

    if address.lower() in ("localhost", "0.0.0.0"):
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:  # a host name
        return False


def _nodes() -> int | None:
    """How many nodes the launch spans, where the launcher says (srun; Open MPI, MVAPICH2: local size < world)."""
    env = os.environ
    if "SLURM_STEP_NUM_NODES" in env:
        return int(env["SLURM_STEP_NUM_NODES"])
    for local_size, size in (("OMPI_COMM_WORLD_LOCAL_SIZE", "OMPI_COMM_WORLD_SIZE"),
                             ("MV2_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_SIZE")):
        if local_size in env and size in env:
            return 1 if int(env[local_size]) == int(env[size]) else 2  # 2: more than one
    return None


def _own_address() -> str:
    """This host's first address (``hostname -I``, as DeepSpeed's MPI discovery takes it), else its name's."""
    import subprocess

    try:
        return subprocess.check_output(["hostname", "-I"], text=True, timeout=10).split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return socket.gethostbyname(socket.getfqdn())


def _mpi_rendezvous(world: int, var: str) -> None:
    """Under mpirun with mpi4py: MASTER_ADDR / MASTER_PORT from rank 0 to every rank (rank 0's own when set, else
    its address and 29500), before any process group; nothing when mpi4py is not installed. An mpi4py whose MPI
    world is not the launcher's (built for another MPI: every process alone) is refused here, before the ranks
    bind one port each and fail on each other."""
    from declip_ds.config import ConfigError

    try:
        from mpi4py import MPI
    except ModuleNotFoundError:
        return
    except Exception as e:  # noqa: BLE001 (an install that cannot load its MPI library)
        raise ConfigError(f"launched by mpirun ({var}={world}), but mpi4py does not load ({type(e).__name__}: {e}): "
                          f"repair it (pip install --no-binary mpi4py mpi4py, against this MPI) or uninstall it and "
                          f"export MASTER_ADDR / MASTER_PORT to every rank (mpirun -x).") from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() != world:
        raise ConfigError(f"launched by mpirun as {world} processes ({var}={world}), but mpi4py sees an MPI world of "
                          f"{comm.Get_size()}: it was built for another MPI library. Rebuild it for this one (pip "
                          f"install --no-binary mpi4py mpi4py) or uninstall it and export MASTER_ADDR / MASTER_PORT "
                          f"to every rank (mpirun -x).")
    env = os.environ
    mine = None
    if comm.Get_rank() == 0:
        try:
            mine = (env.get("MASTER_ADDR") or _own_address(), env.get("MASTER_PORT") or "29500")
        except OSError as e:  # sent as an error: the others are waiting in the bcast
            mine = ("error", f"rank 0 cannot tell its own address ({type(e).__name__}: {e})")
    got = comm.bcast(mine, root=0)
    # nothing later needs MPI; left initialised, mpi4py would finalise it at exit, where a rank that exits on an
    # error waits for the others (which wait in torch's rendezvous for it) instead of leaving mpirun to end the job
    MPI.Finalize()
    if got[0] == "error":
        raise ConfigError(f"launched by mpirun ({var}={world}): {got[1]}; export MASTER_ADDR (the first node's "
                          f"address) and MASTER_PORT to every rank (mpirun -x).")
    env["MASTER_ADDR"], env["MASTER_PORT"] = got


def adopt_launcher_env() -> int | None:
    """Before torch.distributed's init: RANK / WORLD_SIZE / LOCAL_RANK from the launcher. torchrun and the
    deepspeed launcher export them; mpirun and srun export their own (``LAUNCHER_VARS``), which are copied (every
    process would otherwise become a world of one, all on GPU 0, in one output_dir); a plain ``python train.py``
    is a world of one on loopback. The rendezvous address comes from MASTER_ADDR / MASTER_PORT; under mpirun with
    mpi4py installed, from rank 0 through MPI (``_mpi_rendezvous``: rank 0's MASTER_ADDR /
    MASTER_PORT when it has them, else its address and port 29500), the same on every rank whatever its own
    environment holds (mpirun gives remote ranks only what ``-x`` forwards). Returns the launcher's world size
    when its variables were adopted, else None."""
    from declip_ds.config import ConfigError

    env = os.environ
    found = launcher_ranks()
    adopts = _adopts(found)
    if "RANK" in env and not adopts:
        incomplete = [v for v in ("WORLD_SIZE", "LOCAL_RANK") if v not in env]
        if ((found is None or found[1] == 1) and incomplete and int(env.get("WORLD_SIZE", "1")) == 1
                and not any(v in env for v in INNER_LAUNCHER_VARS) and not dist.is_initialized()):
            # no launcher started this process: DeepSpeed's init would look for one through MPI (mpi4py)
            print(f"warning: RANK={env['RANK']} is set without {' / '.join(incomplete)}, and no launcher started this "
                  f"process: it runs as a world of one. Unset RANK if it is left over in your shell.",
                  file=sys.stderr, flush=True)
            for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
                env.pop(v, None)
        else:
            if _under_launcher(found):  # all three set
                _warn_if_rank_differs(found, adopted=False)
            return None
    if adopts:  # some of RANK / WORLD_SIZE / LOCAL_RANK set (a wrapper's RANK=$SLURM_PROCID, or left in the shell)
        _warn_if_rank_differs(found, adopted=True)
    if found is None or found[1] == 1:
        env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
        return None
    rank_, world, local, var = found
    mpi = not var.startswith("SLURM")
    if mpi:
        _mpi_rendezvous(world, var)
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in env]
    if missing:
        raise ConfigError(
            f"launched as {world} processes ({var}={world}: {'mpirun' if mpi else 'srun'}), but "
            f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set, so the ranks cannot find each "
            f"other. Export MASTER_ADDR and MASTER_PORT for every rank (e.g. MASTER_ADDR=<the first node's "
            f"hostname> MASTER_PORT=29500{'; mpirun forwards them with -x' if mpi else ''})"
            f"{', or pip install mpi4py (built for your MPI)' if mpi else ''}, or launch with torchrun or the "
            f"deepspeed launcher's default (pdsh) runner.")
    if _is_loopback(env["MASTER_ADDR"]) and (_nodes() or 1) > 1:
        raise ConfigError(f"MASTER_ADDR={env['MASTER_ADDR']} is a loopback address, but the {world} processes span "
                          f"several nodes: the other nodes' ranks would wait for it until the timeout. Set "
                          f"MASTER_ADDR to the first node's hostname or address.")
    if local is None:
        if "LOCAL_RANK" not in env:
            raise ConfigError(f"launched as {world} processes ({var}={world}), but the launcher gives no local rank "
                              f"(the GPU index on the node): export LOCAL_RANK for every rank, or launch with srun, "
                              f"torchrun or the deepspeed launcher.")
        local = int(env["LOCAL_RANK"])
    if torch.cuda.is_available() and local >= torch.cuda.device_count():
        # the launcher gives each process fewer GPUs than processes per node (srun --gpus-per-task=1): DeepSpeed
        # takes cuda:LOCAL_RANK itself, so LOCAL_RANK must index the GPUs this process sees
        if var.startswith("OMPI"):
            raise ConfigError(
                f"rank {rank_} has local rank {local} but sees {torch.cuda.device_count()} GPU(s): under Open MPI "
                f"DeepSpeed requires LOCAL_RANK = OMPI_COMM_WORLD_LOCAL_RANK as the GPU index, so every process "
                f"must see all of the node's GPUs (do not narrow CUDA_VISIBLE_DEVICES per process).")
        local %= torch.cuda.device_count()
    env.update(RANK=str(rank_), WORLD_SIZE=str(world), LOCAL_RANK=str(local))
    return world


# set by a launcher run inside mpirun's or srun's processes (one per node): torchrun; the deepspeed launcher
INNER_LAUNCHER_VARS = ("TORCHELASTIC_RUN_ID", "CROSS_RANK")


def _warn_if_rank_differs(found, *, adopted: bool) -> None:
    """Under mpirun / srun (``found``), a RANK or WORLD_SIZE set to a value other than the launcher's own for this
    process is most likely left over in the user's shell or job script. Named in a warning on stderr, with what
    happens: ``adopted`` (the set was incomplete), the launcher's values replace it; else (RANK, WORLD_SIZE and
    LOCAL_RANK all set: a wrapper of the user's own may set them on purpose) they are used as they are, and ranks
    that inherited them (mpirun over ssh: the first node's; hydra, srun: every rank) do not take their own places,
    so the rendezvous waits (until the timeout, or for ever inside MPI)."""
    env = os.environ
    rank_, world, _, var = found
    if not any(v in env and env[v] != str(x) for v, x in (("RANK", rank_), ("WORLD_SIZE", world))):
        return
    given = " ".join(f"{v}={env[v]}" for v in ("RANK", "WORLD_SIZE") if v in env)
    launcher = "srun" if var.startswith("SLURM") else "mpirun"
    if adopted:
        missing = " / ".join(v for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if v not in env)
        what = (f"is set without {missing}; the launcher made this process rank {rank_} of {world} ({var}), which is "
                f"used instead. Unset them before the launcher if they are left over in your shell or job script.")
    else:
        what = (f"is set, but {launcher} made this process rank {rank_} of {world} ({var}). RANK is taken instead of "
                f"the launcher's rank; if it is left over in your shell or job script, unset RANK, WORLD_SIZE and "
                f"LOCAL_RANK before {launcher}: the ranks that inherit it do not take their own places, and the "
                f"rendezvous waits for ever or until the timeout.")
    print(f"warning: {given} {what}", file=sys.stderr, flush=True)


def process_group_timeout_s(data_timeout_minutes: float) -> int:
    """The process group's timeout (every collective's): 30 minutes, or longer than ``data.timeout_minutes``
    by 5 minutes, so that the ranks waiting in the batch fetch's collective for a rank whose read stalls
    hear its data error rather than time out first, without the cause."""
    return max(1800, int(60 * data_timeout_minutes) + 300)


def init_distributed(timeout_s: int = 1800) -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed; a lone process becomes a world of one."""
    use_cpu_accelerator_if_no_gpu()
    adopt_launcher_env()
    import deepspeed

    if not dist.is_initialized():
        if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            _init_on_a_fresh_prefix(timedelta(seconds=timeout_s))  # torchrun: see there
        deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s))  # joins an existing default group
        _release_shm_buffer()
    if torch.cuda.is_available():  # modulo: a launcher that gives each process one visible GPU
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return dist.get_rank(), dist.get_world_size()


def _init_on_a_fresh_prefix(timeout: timedelta) -> None:
    """The default process group under torchrun, on a key prefix of the agent's store that no earlier round used.

    torchrun's agent keeps one TCPStore for the whole job, and a restart (``--max-restarts``) hands the new
    workers the same store with the previous round's keys still in it: the peers' addresses that gloo (and NCCL)
    exchange when a group forms. Seen with torch 2.14 and gloo: the restarted workers read the dead ones'
    addresses and fail ("Connection refused") or hang in DeepSpeed's ``new_group`` until the 30-minute timeout.
    ``TORCHELASTIC_RESTART_COUNT`` cannot name the round (it counts the local agent's restarts, which differ
    between nodes), so every rank adds 1 to a counter when it joins: the k-th round's ranks read k*W+1 ..
    (k+1)*W, i.e. the same round k, and the group lives under ``declip_ds/round_<k>/``."""
    from deepspeed.accelerator import get_accelerator

    world, rank_ = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, False, timeout=timeout)
    round_ = (agent.add("declip_ds/joined", 1) - 1) // world
    backend = get_accelerator().communication_backend_name()
    dist.init_process_group(backend, store=dist.PrefixStore(f"declip_ds/round_{round_}", agent), rank=rank_,
                            world_size=world, timeout=timeout)
    if round_:
        log.warning("torchrun restart: rendezvous round %d (the process group ignores the earlier rounds' keys)",
                    round_)


def _release_shm_buffer() -> None:
    """Unlink this rank's /dev/shm file of DeepSpeed's CPU all-reduce, once every rank has mapped it.

    On the CPU accelerator DeepSpeed's init creates ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>
    _<rank>`` (69 MB) per rank and opens the other ranks' (deepspeed/ops/csrc/cpu/comm/shm.cpp), and nothing
    ever removes them: every multi-rank CPU run left them behind (on the development box 300 such files,
    20 GB of tmpfs, had used up the memory). The names only serve that init: after the barrier every rank
    has mapped every buffer, the mappings outlive the names, so each rank unlinks its own, and a rank
    killed later leaves nothing either."""
    if torch.cuda.is_available():
        return
    barrier()
    path = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank()}")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:  # never fail a run over it
        log.warning("could not remove %s (%s); it holds 69 MB of shared memory until deleted", path, e)


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def gather_objects(obj) -> list:
    """Collective: every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a world of one."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_int(value: int, op=dist.ReduceOp.SUM) -> int:
    return all_reduce_ints([value], op)[0]


def all_reduce_ints(values: list[int], op=dist.ReduceOp.SUM) -> list[int]:
    """One collective for several integers (every rank passes the same number of them)."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or not values:
        return list(values)
    t = torch.tensor(values, dtype=torch.long, device=device())
    dist.all_reduce(t, op=op)
    return [int(v) for v in t.tolist()]


# ----------------------------------------------------------------------------- evaluation scripts

# the evaluation scripts' process-group timeout: NCCL's default (10 minutes) is shorter than one rank can
# spend alone, e.g. encoding a large gallery while the others have finished their part, or scoring the whole
# gathered retrieval gallery on rank 0 while the others wait for its numbers
EVAL_TIMEOUT_S = 3600


class RankFailed(ValueError):
    """Raised on the ranks of a group that did not fail, when another rank did (``share_error``): every rank
    stops together instead of waiting in the next collective for the process-group timeout."""


def _group_world(group) -> int:
    return dist.get_world_size(group) if group is not None and dist.is_initialized() else 1


def _mark_shared(error: BaseException) -> None:
    try:
        error.shared_by_every_rank = True  # read by was_shared
    except AttributeError:  # an exception type without a __dict__
        pass


def was_shared(error: BaseException) -> bool:
    """Whether every rank of the group raised with ``error`` (``share_error``: this rank's own error after the
    collective, or ``RankFailed`` for another rank's), so that every rank can take the same way on from it."""
    return isinstance(error, RankFailed) or getattr(error, "shared_by_every_rank", False)


def share_error(error: BaseException | None, group=None, *, values=(), op=dist.ReduceOp.SUM,
                tensor_device=None) -> list[int]:
    """Collective over ``group`` (None: this process alone): all-reduce the integers ``values`` (``op`` SUM or MAX)
    together with each rank's error flag, in one collective. When any rank passes an error, every rank raises:
    that rank its own error, the others ``RankFailed`` naming the failed rank(s) and their messages (gathered in
    one more collective, only then). Returns the reduced ``values``. Every rank of the group must call it at the
    same point, the failed one included: catch the error, then call this instead of the next collective.
    ``tensor_device``: where the flags live (default: this rank's GPU, else the CPU)."""
    world = _group_world(group)
    if error is not None:
        _mark_shared(error)
    if world == 1:
        if error is not None:
            raise error
        return list(values)
    me = dist.get_rank(group)
    n = len(values)
    t = torch.tensor([*values, *(int(error is not None and r == me) for r in range(world))], dtype=torch.long,
                     device=tensor_device if tensor_device is not None else device())
    dist.all_reduce(t, op=op, group=group)
    got = [int(v) for v in t.tolist()]
    failed = [r for r in range(world) if got[n + r]]
    if failed:
        messages = [None] * world
        dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}", group=group)
        if error is not None:
            raise error
        raise RankFailed("; ".join(f"rank {r} of {world} failed ({messages[r]})" for r in failed)
                         + ": stopping every rank.")
    return got[:n]


@contextlib.contextmanager
def errors_shared(group=None):
    """``with errors_shared(group): ...``: an exception raised in the block on any rank is raised on every rank
    of ``group`` when the block ends (``share_error``; one collective, on every exit). For blocks without a
    collective of their own (reading files, opening datasets), so that every rank reaches the end together."""
    error = None
    try:
        yield
    except Exception as e:  # noqa: BLE001 (re-raised by share_error, on this rank and, named, on the others)
        error = e
    share_error(error, group)


def join_eval_ranks(*, timeout_s: int = EVAL_TIMEOUT_S) -> tuple[int, int, object, bool]:
    """For the evaluation scripts: join the launcher's process group when there is one (torchrun and deepspeed
    export RANK / WORLD_SIZE; mpirun's and srun's own variables are adopted as training adopts them), nccl on
    GPUs, gloo otherwise, with an explicit ``timeout_s``, and select this rank's GPU. An existing group is used
    as it is. Returns (rank, world, group, created): a lone process gives (0, 1, None, False); ``created``: this
    call made the group, and its caller destroys it (``eval_ranks`` does)."""
    created = False
    if not dist.is_initialized() and env_world_size() > 1:
        adopt_launcher_env()  # raises a ConfigError (a ValueError) naming what to export
        created = True
    if torch.cuda.is_available():  # before the init: NCCL's communicators and gather_object use this device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if created:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timedelta(seconds=timeout_s))
    if dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_rank(), dist.get_world_size(), dist.group.WORLD, created
    return 0, 1, None, created


@contextlib.contextmanager
def eval_ranks(*, timeout_s: int = EVAL_TIMEOUT_S):
    """``with eval_ranks() as (rank, world, group): ...``: ``join_eval_ranks``, and when the block ends, however
    it ends, the process group destroyed if this call created it (NCCL warns at exit about one left alive)."""
    rank_, world, group, created = join_eval_ranks(timeout_s=timeout_s)
    try:
        yield rank_, world, group
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def run_eval_script(work) -> int:
    """An evaluation script's main: ``work(rank, world, group)`` inside ``eval_ranks`` (the group it made destroyed
    however it ends); the errors raised on every rank together (a file or data error, RankFailed on the ranks
    that did not fail) printed with the rank, exit code 2."""
    rank_ = world = None
    try:
        with eval_ranks() as (rank_, world, group):
            return work(rank_, world, group)
    except (FileNotFoundError, ValueError, NotImplementedError) as e:  # on every rank (RankFailed on the others)
        who = f"rank {rank_} of {world}: " if world and world > 1 else ""
        print(f"{who}error: {e}", file=sys.stderr)
        return 2


def one_process_only(what: str) -> bool:
    """For a script that runs in one process (the linear probe, the suite): True on a launcher's rank other than
    0, after saying so; such a rank returns at once, writing nothing, and rank 0 runs the work alone (several
    copies would compute the same numbers, all on GPU 0, and write the same output files together)."""
    rank_, world = env_rank()
    if world > 1:
        print(f"rank {rank_} of {world}: {what} runs in one process, rank 0, which alone writes the results"
              + ("" if rank_ == 0 else "; this rank exits") + ". Launch one process (plain python) to leave the "
              "other GPUs free.", file=sys.stderr, flush=True)
    return rank_ != 0


def init_eval_ranks(model, *, timeout_s: int = EVAL_TIMEOUT_S):
    """``join_eval_ranks`` and ``model`` moved to this rank's GPU if any. Returns (model, rank, world, group); a
    lone process gives (model, 0, 1, None). The caller that gets a new group destroys it: use ``eval_ranks``
    around the script's work, or call this inside it (it then joins the existing group)."""
    rank_, world, group, _ = join_eval_ranks(timeout_s=timeout_s)
    if torch.cuda.is_available():
        model = model.cuda()
    return model, rank_, world, group
