"""The process group: join the launcher's (or make a one-process one), small collectives, and the
removal of DeepSpeed's shared-memory buffer.

DeepSpeed's CPU comm op (deepspeed/ops/csrc/cpu/comm/shm.cpp, 0.19.8) creates one 66 MB POSIX shared
memory file per rank when every rank is on one machine,
    /dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>
maps every rank's file, and never unlinks any (hundreds had filled a machine's memory). Each rank
unlinks its own file once every rank has mapped every file (a barrier after the op's set-up): the
mappings stay valid, and the kernel frees the memory when the last rank unmaps it, at any exit,
SIGKILL included. An atexit hook repeats the unlink for a process that exits before that point.
Only this rank's file of this run (its uid, address and port) is touched, never another run's.

Every process group is destroyed at exit (another atexit hook): for NCCL that shuts the communicators
down. It does not stop gloo's threads, which DeepSpeed keeps alive until the interpreter's teardown;
every entry point that starts process groups (blues-train, the benchmarks, a user's own script) ends
with exit_process, which skips that teardown (its docstring has the measurement).
"""
from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
from dataclasses import dataclass
from typing import NoReturn, Optional

import torch

from blues.common import free_port

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
SHM_PREFIX = "deepspeed_allreduce_buffer"


@dataclass
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    nproc_per_node: int
    device: torch.device


def init_distributed() -> DistInfo:
    """Join the launcher's process group (or make a one-process one). nccl on CUDA, else gloo."""
    import deepspeed

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:  # plain `blues-train`
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    nproc_per_node = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", str(world))))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        # NOTE: every rank would otherwise start one thread per core: 2 ranks on 2 cores ran 2x slower.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, nproc_per_node)))
        device = torch.device("cpu")
    if not torch.distributed.is_initialized():
        # registered first: a rank that exits before the barrier below still removes its file
        atexit.register(lambda: remove_shm_buffer(shm_buffer_path(rank)))
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        atexit.register(destroy_process_groups)  # runs before the unlink above (atexit is last-in, first-out)
        barrier()  # every rank has mapped every rank's buffer (shm_initialize returned everywhere)
        remove_shm_buffer(shm_buffer_path(rank))
    return DistInfo(rank, world, local_rank, nproc_per_node, device)


def shm_buffer_path(rank: int, env: Optional[dict] = None) -> str:
    """The /dev/shm file DeepSpeed's CPU comm op creates for `rank` of the run `env` describes."""
    env = os.environ if env is None else env
    name = f"{SHM_PREFIX}_{os.getuid()}_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}_{rank}"
    return os.path.join(SHM_DIR, name)


def remove_shm_buffer(path: str) -> None:
    """Unlink `path` if it is there (idempotent: the atexit hook calls it again)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:  # not ours to fix, but say so: the file holds 66 MB until a reboot
        log.warning("could not remove DeepSpeed's shared-memory buffer %s: %s", path, e)


def destroy_process_groups() -> None:
    """Destroy every process group this process holds (a no-op when there is none). Local to the rank:
    no collective, so a rank whose peer has already gone does not wait for it."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def exit_process(code: Optional[int] = 0) -> NoReturn:
    """End this process with exit status `code` (None is 0, as for sys.exit), skipping the interpreter's
    teardown: the last call of a rank's entry point (blues-train, a benchmark, your own training script),
    never of a library function.

    What a normal exit does that a run relies on is done first: other non-daemon threads are joined,
    every atexit hook runs (logging's flush, destroy_process_groups, the /dev/shm unlink, DeepSpeed's
    and the user's own), stdout and stderr are flushed. Then os._exit(code).

    NOTE: measured in a 2-rank blues-train (ZeRO 2 with ep_size=2, and ZeRO 3): after
    destroy_process_groups the threads of all 4 gloo groups were still running (a gloo_tcp_loop and two
    pt_gloo_runloop threads each), and after deepspeed.comm.destroy_process_group() and gc.collect() still
    4 (ZeRO 2) and 3 (ZeRO 3). DeepSpeed holds the groups: its groups module, ZeRO's attributes on every
    parameter, and under ZeRO 3 the model itself, pushed for good onto
    deepspeed.runtime.zero.parameter_offload.FWD_MODULE_STACK. They are freed, if at all, while the
    interpreter is torn down, and there a rank that had finished its work aborted ("terminate called
    without an active exception", exit -6): in CI, once in tests/train/test_balance.py's ranks and once
    in blues-train resuming under ZeRO 3."""
    me = threading.current_thread()
    for t in threading.enumerate():  # what the interpreter's shutdown does before the atexit hooks
        if t is not me and not t.daemon:
            t.join()
    atexit._run_exitfuncs()  # runs each hook once, last registered first, and empties the list
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed or broken pipe: nothing left to save
            pass
    os._exit(0 if code is None else code)


def all_reduce(t: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce of `t` over every rank (a no-op on one process); returns `t`."""
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(t, op=getattr(torch.distributed.ReduceOp, op.upper()))
    return t


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
