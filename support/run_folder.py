"""A run's folder, where nothing is lost unasked: a folder holding a run is continued (--resume) or replaced
(--overwrite), never overwritten silently; one process at a time trains in it (<out>/.lock); files are replaced
atomically; Ctrl-C or SIGTERM lets the step end and be saved, and the command that goes on is said."""
import contextlib
import dataclasses
import os
import shlex
import shutil
import signal
import socket
import threading

try:
    import fcntl
except ImportError:  # Windows: run folders are not locked
    fcntl = None

import torch
import torch.distributed as dist

from support import runtime


@dataclasses.dataclass
class Session:
    """What keeping a run folder needs to know of this command: its arguments as typed (for the command that goes
    on), this process among torchrun's, the folder's lock, and a stop asked by a signal."""
    argv: list
    rank: int = 0
    world: int = 1
    lock: object = None  # the open <out>/.lock while rank 0 holds the folder
    deferred: bool = False  # a signal waits for the step's end (a run that has something to save)
    signum: int | None = None  # the signal that asked to stop


def save_atomically(obj, path):
    """torch.save through a temporary file renamed into place: a run killed, or a disk full, while saving leaves the
    previous file intact and no temporary one. A failed write is an OSError that says so in one line."""
    tmp = path + ".tmp"
    try:
        torch.save(obj, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # on disk before the rename, so a crash cannot leave an empty file in its place
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        # torch's writer reports a full disk as a RuntimeError of its zip writer ("unexpected pos ...")
        if not (isinstance(e, OSError) or isinstance(e, RuntimeError) and "inline_container" in str(e)):
            raise
        why = e.strerror or str(e) if isinstance(e, OSError) else "the file could not be written in full"
        free = shutil.disk_usage(os.path.dirname(path) or ".").free / 2 ** 20
        raise OSError(f"could not write {path} ({why}; {free:.0f} MiB free there): the previous "
                      f"{os.path.basename(path)}, if any, is intact; free some space and run the same command with "
                      "--resume") from e


# ------------------------------------------------------------ the folder: never overwritten unasked, one run at a time

RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl")  # what makes a folder hold a run


def check_folder(args):
    """A folder that holds a run is continued (--resume) or replaced (--overwrite), never silently overwritten."""
    found = [name for name in RUN_FILES if os.path.exists(os.path.join(args.out, name))]
    if args.resume and "last.pt" not in found:
        restart = "without --resume" + (" and with --overwrite" if found else "")
        raise runtime.CommandError(f"--resume: no checkpoint at {os.path.join(args.out, 'last.pt')} (the run saved "
                                   f"nothing to resume): start it {restart}", 2)
    if found and not (args.resume or args.overwrite):
        ways = "continue it with --resume, " if "last.pt" in found else ""
        raise runtime.CommandError(f"{args.out} holds a run ({', '.join(found)}): {ways}start another with another "
                                   "--out, or replace this one with --overwrite", 2)
    for name in RUN_FILES + ("test.json",) if args.overwrite else ():
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(args.out, name))


def claim_folder(args):
    """<out>/.lock, held (flock) while this process trains there; returns its open file. The kernel drops the hold of
    a process that dies, so a lock left by a killed run is taken over, never obeyed forever; the file names the
    holder (pid, host) for the message of the process refused."""
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, ".lock")
    while True:
        f = open(path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().split() or ["?", "?"]
            f.close()
            raise runtime.CommandError(f"{args.out} is in use by train.py process {holder[0]} on {holder[-1]} (it "
                                       f"holds {path}): wait for it to end, or choose another --out") from None
        if os.path.exists(path) and os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
            break
        f.close()  # the holder removed the file as we opened it: try again on the new one
    f.seek(0)
    if f.read().split():
        print(f"{path}: the process that held it is gone; taken over", flush=True)
    f.truncate(0)
    f.write(f"{os.getpid()} {socket.gethostname()}\n")
    f.flush()
    try:
        check_folder(args)
    except BaseException:
        release_folder(f)
        raise
    return f


def release_folder(lock):
    if lock is not None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock.name)  # while still held: no other process can have taken it in between
        lock.close()


def hold_folder(args, session):
    """Rank 0 holds --out (session.lock); its verdict is every process's, so that none waits for a refused run."""
    verdict = [None]
    if session.rank == 0:
        try:
            if fcntl:
                session.lock = claim_folder(args)
            else:  # no flock (Windows): the folder is checked, not locked
                os.makedirs(args.out, exist_ok=True)
                check_folder(args)
        except (runtime.CommandError, OSError) as e:
            verdict = [(str(e.code if isinstance(e, SystemExit) else e), getattr(e, "status", 1))]
    if session.world > 1:
        dist.broadcast_object_list(verdict, src=0)
    if verdict[0]:
        raise runtime.CommandError(*verdict[0])


# ------------------------------------------------------------ Ctrl-C and SIGTERM: end the step, save, say how to go on

@contextlib.contextmanager
def stop_on_signals(session):
    """While session.deferred (a run that can be saved), SIGINT or SIGTERM only sets session.signum: training ends its
    step, saves last.pt and stops. Before that, and at a second signal, the command stops at once."""
    def handler(signum, frame):
        if session.deferred and session.signum is None:
            session.signum = signum
            if session.rank == 0:  # os.write: a print could be the one this signal interrupted
                os.write(2, f"\n{signal.Signals(signum).name}: stopping after this step, last.pt saved (Ctrl-C "
                            "again: stop at once)\n".encode())
            return
        raise runtime.Interrupted(signum=signum)
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread only
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s, h in previous.items():
        if h != signal.SIG_IGN:  # an ignored signal stays ignored (nohup, a background job)
            signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, signal.SIG_DFL if h is None else h)


def resume_command(args, session):
    """The command that goes on with the run in --out, as typed: --resume once a last.pt is there."""
    argv, saved = list(session.argv), os.path.isfile(os.path.join(args.out, "last.pt"))
    if saved:
        argv = [a for a in argv if a != "--overwrite"] + ([] if args.resume else ["--resume"])
    elif any(os.path.exists(os.path.join(args.out, name)) for name in RUN_FILES) and not args.overwrite:
        argv.append("--overwrite")
    launcher = f"torchrun --nproc_per_node={session.world} train.py" if session.world > 1 else "python train.py"
    return " ".join([launcher, *map(shlex.quote, argv)])
