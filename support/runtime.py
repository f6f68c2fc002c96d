"""The run-time choices train.py, evaluate.py, bench.py and table.py share: which backbone (and the demo's), which
precision (bf16 where the hardware computes it natively), and the CPU allocator setting."""
import ctypes
import os
import signal
import sys
import threading
import warnings

import torch
import torch.nn as nn

import adapter
import clip_min
import recipe
from support import demo

DEMO_CLIP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "mini-clip.pt")


def load_backbone(clip, dataset, seed, device, activation=None):
    """The frozen CLIP: a released name, a checkpoint path or a Hugging Face folder (activation: see clip_min.load);
    for the demo, the bundled mini CLIP if present, else a randomly initialised tiny CLIP (the same one for a given
    seed, so a trained adapter finds its backbone again)."""
    if clip is None and dataset == "demo":
        found = os.path.isfile(DEMO_CLIP)
        backbone = "a mini CLIP pretrained on synthetic data" if found else "a randomly initialised tiny CLIP"
        print(f"demo: synthetic images and captions, and {backbone} instead of OpenAI's ViT-B/32. This run "
              "demonstrates the pipeline; its numbers say nothing about the paper's.")
        if found:
            clip = DEMO_CLIP
        else:
            torch.manual_seed(seed)
            return clip_min.CLIP(demo.MINI_CLIP).to(device).eval()
    return clip_min.load(clip or "ViT-B/32", device=device, activation=activation)[0]


# ------------------------------------------------------------ the backbone a checkpoint names, from any folder

BUNDLED = "assets/mini-clip.pt"  # how a checkpoint names DEMO_CLIP, wherever the repository lies


def weights_sha256(path):
    """The SHA-256 of a weights file, or of the weights file of a Hugging Face folder."""
    return clip_min.download.sha256_of(clip_min.weights._weights_file(path))


def backbone_record(clip, dataset, seed):
    """How a run's checkpoints name its backbone (load_backbone's choice for these arguments), so that a later
    command started from any folder rebuilds it: a released model by name, a file (or Hugging Face folder) by
    absolute path and SHA-256, the bundled mini CLIP as such, the demo's random tiny CLIP by its seed."""
    if clip is None and dataset == "demo":
        if not os.path.isfile(DEMO_CLIP):
            return {"random_tiny_clip_seed": seed}
        clip = DEMO_CLIP
    clip = clip or "ViT-B/32"
    if clip in clip_min.download.MODELS:
        return {"name": clip, "sha256": clip_min.download.MODELS[clip][1]}
    path, sha256 = os.path.abspath(clip), weights_sha256(clip)
    if os.path.isfile(DEMO_CLIP) and os.path.samefile(path, DEMO_CLIP):
        return {"bundled": BUNDLED, "sha256": sha256}
    return {"file": path, "sha256": sha256}


def recorded_backbone(state):
    """(clip, dataset, seed) for load_backbone that rebuild a checkpoint's backbone; a recorded file that moved or
    changed since is an error that says so and names --clip. A checkpoint of an earlier version, without a record:
    its --clip as typed, or its run's dataset's default."""
    saved, record = state.get("args", {}), state.get("backbone")
    if record is None:
        return state.get("clip"), saved.get("dataset"), saved.get("seed", recipe.SEED)
    if "random_tiny_clip_seed" in record:
        return None, "demo", record["random_tiny_clip_seed"]
    if "name" in record:
        return record["name"], None, None
    path = DEMO_CLIP if "bundled" in record else record["file"]
    if not os.path.exists(path):
        raise FileNotFoundError(f"this checkpoint's backbone, {path} (sha256 {record['sha256'][:12]}...), is not "
                                "there any more (moved or deleted): pass that file with --clip")
    if weights_sha256(path) != record["sha256"]:
        raise ValueError(f"this checkpoint's backbone, {path}, has changed since it was trained on it (sha256 "
                         f"{record['sha256'][:12]}... then, {weights_sha256(path)[:12]}... now): pass the original "
                         "weights with --clip")
    return path, None, None


def same_backbone(record, clip, dataset, seed):
    """Whether load_backbone(clip, dataset, seed) gives the backbone `record` names (the same weights, wherever)."""
    ours = backbone_record(clip, dataset, seed)
    return all(ours.get(k) == record.get(k) for k in ("sha256", "random_tiny_clip_seed"))


def read_run_checkpoint(path):
    """A best.pt or last.pt written by train.py: the trained tensors, the method and its options, the run's
    arguments. Another kind of file is refused with the option that reads it."""
    if os.path.isdir(path):
        inside = os.path.join(path, "best.pt")
        raise FileNotFoundError(f"{path} is a run folder: pass its checkpoint, {inside}" if os.path.isfile(inside)
                                else f"{path} is a folder, not a checkpoint: pass a best.pt/last.pt written by train.py")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # torch's note on an OpenAI (TorchScript) file: said below, in a line
            warnings.filterwarnings("ignore", message=".*TorchScript archive")
            state = clip_min.formats.torch_load(path)
    except clip_min.formats.UnreadableFile:
        if released_checkpoint(path):
            raise ValueError(f"{path} is a checkpoint of the authors' released code: score it with "
                             f"evaluate.py --official-checkpoint {path} --dataset <name>") from None
        if clip_weights(path):
            raise ValueError(f"{path} holds CLIP weights (a model file such as OpenAI's), not a checkpoint written "
                             "by train.py: pass it as --clip (evaluate.py --method zeroshot --clip ... scores it "
                             "frozen)") from None
        raise
    if isinstance(state, dict) and "trainable" in state:
        return state
    if isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} holds a model's weights, not a checkpoint written by train.py: pass it as --clip "
                         "(evaluate.py --method zeroshot --clip ... scores it frozen)")
    raise ValueError(f"{path} is not a checkpoint written by train.py (no 'trainable' entry): pass a run's best.pt "
                     "or last.pt")


def released_checkpoint(path):
    """Whether path is a checkpoint the authors' train.py saved (read without running anything from it)."""
    try:
        state = clip_min.formats.read_checkpoint(path)
    except (ValueError, OSError):
        return False
    return isinstance(state, dict) and isinstance(state.get("model"), dict)


def clip_weights(path):
    """Whether path is a file clip_min.load reads (an OpenAI archive, a safetensors file, ...)."""
    try:
        return bool(clip_min.weights.read_weights(path)[0])
    except Exception:  # whatever the readers make of it, it is no weights file
        return False


def trained_model(state, device, clip=None, activation=None, method=None, dataset=None):
    """The model a train.py checkpoint holds (state: read_run_checkpoint's), in eval mode: its backbone (or `clip`) with
    its method and trained weights. Without a state, `method` on the frozen backbone of `clip` and `dataset`
    (zeroshot: CLIP itself). A method other than the checkpoint's is refused: its tensors would not fit."""
    if state and method not in (None, state["method"]):
        raise ValueError(f"this checkpoint was trained with method {state['method']}, not {method}: leave --method "
                         f"out (or pass --method {state['method']})")
    method, given, seed = method or state["method"], clip, recipe.SEED
    if state and clip is None:
        clip, dataset, seed = recorded_backbone(state)
    backbone = load_backbone(clip, dataset, seed, device, activation or state.get("activation"))
    if state.get("backbone") and given and not same_backbone(state["backbone"], given, None, None):
        print(f"note: --clip {given} is not the backbone this checkpoint was trained on (other weights, or the same "
              "ones in another file format): scoring with it", file=sys.stderr)
    model = adapter.apply(backbone, method, **state.get("options", {})).to(device).eval()  # the trained sizes
    if state:
        adapter.load_trainable(model, state["trainable"])
    return model


def cpu_has_native_bf16():
    """Whether this CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX), where bf16 runs several times
    faster than fp32; without them bf16 is emulated and slower than fp32."""
    return any(getattr(torch.cpu, query, bool)() for query in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def default_amp(device, say=print):
    """bf16 autocast where the hardware computes bf16 natively (most GPUs; CPUs with AVX512-BF16 or AMX), else fp32.
    The choice and its reason are said once."""
    if device.type == "cuda":
        amp, why = ("bf16", "this GPU supports it") if torch.cuda.is_bf16_supported() else ("off", "no bf16 on this GPU")
    elif cpu_has_native_bf16():
        amp, why = "bf16", "this CPU has bf16 matrix instructions (AVX512-BF16 or AMX)"
    else:
        amp, why = "off", "this CPU has no bf16 matrix instructions: bf16 would be slower than fp32"
    say(f"precision: --amp {amp} ({why}; set --amp to choose)")
    return amp


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}  # --amp off: fp32


def autocast(device_type, amp):
    """Mixed precision for --amp bf16 or fp16 (a no-op context for off)."""
    dtype = AMP_DTYPES.get(amp)
    return torch.autocast(device_type, dtype=dtype or torch.float32, enabled=dtype is not None)


def keep_frozen_weights_in(model, amp):
    """Under bf16/fp16 autocast, store the frozen weights that only matrix products read in that precision, once.

    Autocast caches the low-precision copy of trainable weights only: a frozen backbone's weights would be cast again
    at every call. The cast is the same rounding autocast makes, so every result is unchanged. A method names the
    submodules whose weights it reads otherwise in `full_precision` (LoRA: the attention it adds its update to).
    """
    dtype = AMP_DTYPES.get(amp)
    kept = {id(getattr(m, name)) for m in model.modules() for name in getattr(m, "full_precision", ())}
    for module in model.modules() if dtype else []:
        matmul_only = isinstance(module, (nn.Linear, nn.Conv2d, clip_min.model.Attention)) and id(module) not in kept
        for p in module.parameters(recurse=False) if matmul_only else []:
            if not p.requires_grad:
                p.data = p.data.to(dtype)


def keep_freed_memory():
    """CPU speed: freed tensors stay in the process for the next step instead of going back to the OS (glibc).

    glibc returns every block above 32 MB to the OS when it is freed (at batch 64 one MLP activation of ViT-B/32 is
    80 MB), and the next step would page-fault and zero-fill it again.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-4, 0)  # M_MMAP_MAX = 0: large blocks come from the heap, where freed memory is reused
        libc.mallopt(-1, 2 ** 31 - 1)  # M_TRIM_THRESHOLD: the heap's free top is kept, not trimmed after each step
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, Windows): nothing to tune
        pass


class CommandError(SystemExit):
    """A failure the user can fix (a file, a value, a folder in use): the command ends with `error: <message>` and
    exit status `status` (2: a usage error, as argparse's). A SystemExit, so that whatever runs main() in-process
    sees the command end, as with argparse."""

    def __init__(self, message, status=1):
        super().__init__(message)
        self.status = status


class Interrupted(KeyboardInterrupt):
    """A stop asked by a signal (Ctrl-C: SIGINT, a scheduler's SIGTERM); the message, if any, says how to go on. A
    KeyboardInterrupt, as Ctrl-C's own, for whatever runs a command in-process."""

    def __init__(self, message=None, signum=signal.SIGINT):
        super().__init__(*([message] if message else []))
        self.signum = signum


def _interrupt(signum, frame):
    raise Interrupted(signum=signum)


def _say(line):
    print(" ".join(str(line).split("\n")), file=sys.stderr, flush=True)  # one line, whatever the message holds


def run_command(main):
    """Run a command's main(): what a user's file, value or signal ends becomes one line on stderr and an exit
    status (1, 2 for usage, 128 + the signal's number); a traceback is kept for the project's own bugs, and for
    every failure with PE_RSITR_TRACEBACK=1. A stop by a signal says its message (how to go on), if any."""
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)  # a scheduler's stop ends like Ctrl-C: a line, not silence
    try:
        main()
    except KeyboardInterrupt as e:  # Interrupted included
        if os.environ.get("PE_RSITR_TRACEBACK"):
            raise
        signum = getattr(e, "signum", signal.SIGINT)
        print(file=sys.stderr)  # off the line the terminal's ^C is on
        _say(e.args[0] if e.args else "interrupted")
        sys.exit(128 + signum)
    except SystemExit as e:  # argparse's exit (its lines already said), or a command's refusal
        if isinstance(e.code, str) and not os.environ.get("PE_RSITR_TRACEBACK"):
            _say(f"error: {e.code}")
            sys.exit(getattr(e, "status", 1))
        raise
    except (OSError, ValueError) as e:  # a missing, damaged or unreadable file; a value no reader accepts
        if os.environ.get("PE_RSITR_TRACEBACK"):
            raise
        _say(f"error: {e}")
        sys.exit(1)
