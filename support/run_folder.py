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
    claimed: bool = False  # this process holds --out (rank 0), checked
    made_folder: bool = False  # this command created --out
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

# What makes a folder hold a run: a zero-shot run (metrics.jsonl, test.json) is one too, and is refused like any.
RUN_FILES = ("last.pt", "best.pt", "metrics.jsonl", "test.json")
STARTED_FILES = ("metrics.jsonl", "splits.json", "val_images.txt")  # what a run writes before its first save


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
    for name in RUN_FILES if args.overwrite else ():
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


def leave_folder(args, session, failed=False):
    """Lets go of --out. After a failure, a run this command started that saved nothing leaves no trace: the files
    it wrote, and the folder if it made it, so that the same command (or the one its message names) starts anew."""
    unsaved = failed and session.claimed and not args.resume and not any(
        os.path.exists(os.path.join(args.out, name)) for name in ("last.pt", "test.json"))
    for name in STARTED_FILES if unsaved else ():
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(args.out, name))
    release_folder(session.lock)
    if failed and session.made_folder and (unsaved or not session.claimed):
        with contextlib.suppress(OSError):  # not empty: files of another command, or a lock taken since
            os.rmdir(args.out)


def release_folder(lock):
    if lock is not None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(lock.name)  # while still held: no other process can have taken it in between
        lock.close()


def hold_folder(args, session):
    """Rank 0 holds --out (session.lock); its verdict is every process's, so that none waits for a refused run."""
    verdict = [None]
    if session.rank == 0:
        session.made_folder = not os.path.exists(args.out)
        try:
            if os.path.exists(args.out) and not os.path.isdir(args.out):
                raise runtime.CommandError(f"--out {args.out} is a file, not a folder: choose another --out", 2)
            if fcntl:
                session.lock = claim_folder(args)
            else:  # no flock (Windows): the folder is checked, not locked
                os.makedirs(args.out, exist_ok=True)
                check_folder(args)
            session.claimed = True
        except runtime.CommandError as e:
            verdict = [(e.code, e.status)]
        except OSError as e:
            verdict = [(f"--out {args.out}: cannot write there ({e.strerror or e})", 1)]
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


def resume_command(args, session, change=()):
    """The command that goes on with the run in --out, as typed: --resume once a last.pt is there (a run that saved
    nothing leaves nothing: leave_folder). change: [flag, value, ...] set anew in place of the typed values."""
    argv, saved = argv_without(session.argv, change[::2]), os.path.isfile(os.path.join(args.out, "last.pt"))
    if saved:
        argv = [a for a in argv if a != "--overwrite"] + ([] if args.resume else ["--resume"])
    argv += change
    launcher = f"torchrun --nproc_per_node={session.world} train.py" if session.world > 1 else "python train.py"
    return " ".join([launcher, *map(shlex.quote, argv)])


def argv_without(argv, flags):
    """argv without the options `flags` and their values (typed as --flag value or --flag=value)."""
    kept, skip = [], False
    for a in argv:
        if not skip and a.split("=")[0] not in flags:
            kept.append(a)
        skip = a in flags
    return kept
