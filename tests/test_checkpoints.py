"""clip_min loads the CLIP checkpoints remote sensing models ship as (open_clip state_dicts and training checkpoints,
Hugging Face CLIPModel folders), and reads training checkpoints that pickle arbitrary objects without running them."""
import argparse
import collections
import copy
import colorsys  # a module the planted checkpoint names; read_checkpoint must not import it again
import json
import os
import shutil
import sys
import warnings

import open_clip
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
import transformers

import adapter
import clip_min
import data
import evaluate
import metrics
from benchmarks import released_path
from clip_min import formats
from support import released, runtime
from helpers import MICRO, SMALL, reference_clip, save_openai_archive

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from clip import clip as openai_clip_module  # OpenAI's preprocess, as the released training code pickled it

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit:FutureWarning")

CAPTIONS = ["two planes are parked next to the terminal", "a river"]


def perturb(model, seed=1):
    """Random LayerNorms, biases, class embedding and logit scale, so that a misplaced or transposed one shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() <= 1:  # every 1-D "weight" of these models is a LayerNorm's
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
    return model.eval()


def embeddings(model, resolution):
    torch.manual_seed(2)
    images, tokens = torch.randn(1, 3, resolution, resolution), clip_min.tokenize(CAPTIONS)
    with torch.no_grad():
        if isinstance(model, transformers.CLIPModel):
            # The feature getters return a tensor (transformers 4) or an output holding it (5).
            image = model.get_image_features(pixel_values=images)
            text = model.get_text_features(input_ids=tokens)
            return getattr(image, "pooler_output", image), getattr(text, "pooler_output", text)
        return model.encode_image(images), model.encode_text(tokens)


def max_diff(ours, theirs):
    assert theirs[0].abs().mean() > 1e-2 and theirs[1].abs().mean() > 1e-2  # not trivially small
    return max((a - b).abs().max().item() for a, b in zip(ours, theirs))


# ---------------------------------------------------------------------------------------------------- open_clip

# One file format per model, to save time: both formats and both activations are covered.
@pytest.mark.parametrize("name, activation, file_format", [("ViT-B-32", "gelu", "state_dict"),
                                                           ("ViT-B-32-quickgelu", "quick_gelu", "training")])
@pytest.mark.slow
def test_open_clip_checkpoints(name, activation, file_format, tmp_path, capfd):
    reference = perturb(open_clip.create_model(name, pretrained=None))
    expected = embeddings(reference, 224)
    path = tmp_path / "model.pt"
    if file_format == "state_dict":
        torch.save(reference.state_dict(), path)  # RemoteCLIP's and GeoRSCLIP's format
    else:  # open_clip's training checkpoint of a DistributedDataParallel run
        state_dict = {"module." + k: v for k, v in reference.state_dict().items()}
        optimizer = {"state": {}, "param_groups": [{"lr": 5e-4, "betas": (0.9, 0.98), "params": [0]}]}
        torch.save({"epoch": 3, "name": "run", "state_dict": state_dict, "optimizer": optimizer}, path)
    capfd.readouterr()
    model = clip_min.load(str(path), activation=activation)[0]
    assert capfd.readouterr().err == ""  # an explicit activation needs no remark
    assert model.config.activation == activation
    assert torch.equal(model.logit_scale, reference.logit_scale)
    assert max_diff(embeddings(model, 224), expected) <= 1e-4
    wrong = {"gelu": "quick_gelu", "quick_gelu": "gelu"}[activation]
    assert max_diff(embeddings(clip_min.build_model(model.state_dict(), wrong), 224), expected) > 1e-2


def test_refuses_towers_clip_min_cannot_hold(tmp_path):
    with torch.device("meta"):
        vit = open_clip.create_model("ViT-B-32", pretrained=None, device="meta").state_dict()
        resnet = open_clip.create_model("RN50", pretrained=None, device="meta").state_dict()
        huge = open_clip.create_model("ViT-H-14", pretrained=None, device="meta").state_dict()
    hf_text = [k for k in vit if k.startswith("visual.")] + [
        "logit_scale", "text.transformer.embeddings.word_embeddings.weight", "text.transformer.pooler.dense.weight"]
    for keys, first_foreign in [(list(resnet), next(k for k in resnet if k not in vit)),
                                (hf_text, "text.transformer.embeddings.word_embeddings.weight")]:
        path = tmp_path / "model.pt"
        torch.save({k: torch.zeros(1) for k in keys}, path)  # the names decide; the tensors are never used
        with pytest.raises(ValueError, match=f"not a ViT CLIP .*'{first_foreign}'"):
            clip_min.load(str(path))
    # Same names as ViT-B/32 but 80-wide attention heads, which shapes cannot reveal (GeoRSCLIP's largest model).
    with pytest.raises(ValueError, match="1280 wide is open_clip's ViT-H"):
        clip_min.build_model(huge)


# ---------------------------------------------------------------------------------------------------- activation

def test_activation_recorded_or_announced(tmp_path, capfd):
    archive, state_dict_file = tmp_path / "openai.pt", tmp_path / "state_dict.pt"
    save_openai_archive(reference_clip(SMALL), archive)
    torch.save(clip_min.CLIP(MICRO).state_dict(), state_dict_file)
    capfd.readouterr()
    assert clip_min.load(str(archive))[0].config.activation == "quick_gelu"  # OpenAI's files are QuickGELU models
    assert clip_min.load(str(state_dict_file), activation="gelu")[0].config.activation == "gelu"
    assert capfd.readouterr().err == ""
    assert clip_min.load(str(state_dict_file))[0].config.activation == "quick_gelu"
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and "assumed QuickGELU" in err
    assert "activation='gelu'" in err and "--clip-activation gelu" in err
    with pytest.raises(ValueError, match="unknown activation 'relu'"):
        clip_min.load(str(state_dict_file), activation="relu")


# ---------------------------------------------------------------------------------------------------- Hugging Face

def hugging_face_clip(activation, small):
    """A transformers CLIPModel: OpenAI's ViT-B/32, or a small one, with the given MLP activation."""
    text = dict(hidden_act=activation, eos_token_id=49407)  # pooled at the first end token: OpenAI's argmax rule
    vision = dict(hidden_act=activation, image_size=224, patch_size=32)
    if small:
        text.update(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2)
        vision.update(hidden_size=192, intermediate_size=768, num_hidden_layers=2, num_attention_heads=3, image_size=64,
                      patch_size=16)
    config = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=96 if small else 512)
    torch.manual_seed(0)
    return perturb(transformers.CLIPModel(config))


def save_hugging_face(model, root):
    """The two layouts of a Hugging Face model folder: model.safetensors, and pytorch_model.bin (older files)."""
    model.save_pretrained(root / "st")
    (root / "bin").mkdir()
    shutil.copy(root / "st" / "config.json", root / "bin")
    torch.save(model.state_dict(), root / "bin" / "pytorch_model.bin")  # what save_pretrained wrote before safetensors
    return root / "st", root / "bin"


@pytest.mark.slow
@pytest.mark.parametrize("activation, small", [("quick_gelu", False), ("gelu", True)], ids=["ViT-B-32", "small-gelu"])
def test_hugging_face_clip(activation, small, tmp_path, capfd):
    reference = hugging_face_clip(activation, small)
    resolution = reference.config.vision_config.image_size
    expected = embeddings(reference, resolution)
    st_folder, bin_folder = save_hugging_face(reference, tmp_path)
    capfd.readouterr()
    for path in (st_folder, bin_folder / "pytorch_model.bin"):  # a folder, or the weights file beside its config.json
        model = clip_min.load(str(path))[0]
        assert model.config.activation == activation and model.visual.input_resolution == resolution
        assert torch.equal(model.logit_scale, reference.logit_scale)
        assert max_diff(embeddings(model, resolution), expected) <= 1e-4
    assert capfd.readouterr().err == ""  # config.json records the activation


def test_hugging_face_config_clip_min_cannot_follow(tmp_path):
    folder = save_hugging_face(hugging_face_clip("gelu", small=True), tmp_path)[0]
    config = json.loads((folder / "config.json").read_text())
    edits = [("vision_config", {"num_attention_heads": 2}, "vision tower's attention heads are not 64"),
             ("text_config", {"hidden_act": "quick_gelu"}, "different activations"),
             ("text_config_dict", {"hidden_act": "quick_gelu"}, "different activations")]  # older files; it wins
    for key, change, message in edits:
        edited = {**config, key: {**config.get(key, {}), **change}}
        (folder / "config.json").write_text(json.dumps(edited))
        with pytest.raises(ValueError, match=message):
            clip_min.load(str(folder))


# ---------------------------------------------------------------------------------------------------- safetensors

def test_safetensors_reader_matches_the_package(tmp_path):
    assert {"F32", "F16", "BF16", "I64"} <= set(formats.SAFETENSORS_DTYPES)
    torch.manual_seed(0)
    tensors = {}
    for i, dtype in enumerate(formats.SAFETENSORS_DTYPES.values()):
        shape = [(3, 5), (7,), (), (0, 4), (2, 1, 3)][i % 5]
        values = torch.randn(shape) * 50
        integers = values.to(torch.int64)  # the narrow types wrap around: only the stored bytes matter
        tensors[f"t{i}.{dtype}"] = values.to(dtype) if dtype.is_floating_point else integers.to(dtype)
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    ours, theirs = formats.read_safetensors(path), safetensors.torch.load_file(path)
    assert list(ours) == list(theirs) and set(ours) == set(tensors)
    for name, expected in theirs.items():
        assert ours[name].dtype == expected.dtype and ours[name].shape == expected.shape, name
        assert torch.equal(ours[name], expected), name


def test_safetensors_reader_rejects_broken_files(tmp_path):
    good = tmp_path / "good.safetensors"
    safetensors.torch.save_file({"a": torch.arange(6.0), "b": torch.ones(2, 2)}, good)
    data, header_size = good.read_bytes(), int.from_bytes(good.read_bytes()[:8], "little")

    def header_file(header):
        raw = json.dumps(header).encode() if isinstance(header, (dict, list)) else header
        return len(raw).to_bytes(8, "little") + raw + bytes(16)

    def entry(dtype, shape, offsets):
        return header_file({"a": {"dtype": dtype, "shape": shape, "data_offsets": offsets}})

    broken = {
        "data": (data[:-3], "truncated: tensor '.' ends past the end"),
        "header": (data[:8 + header_size // 2], "truncated: .* bytes cannot hold"),
        "size": (data[:5], "truncated"),
        "json": (header_file(b'{"a": {"dtype": "F32",'), "the header is not JSON"),
        "list": (header_file([1, 2]), "the header is not a JSON object"),
        "dtype": (entry("F7", [2], [0, 8]), "tensor 'a' has no supported dtype"),
        "offsets": (entry("F32", [3], [0, 8]), "tensor 'a' spans 8 bytes"),
    }
    for name, (content, message) in broken.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        with pytest.raises(ValueError, match=f"{name}.safetensors is not a valid safetensors file: {message}"):
            formats.read_safetensors(path)


# ---------------------------------------------------------------------------------------------------- read_checkpoint

class RunsCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class CallsTorchSave:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return torch.save, ({"planted": True}, self.path)


def released_checkpoint(tmp_path, marker):
    """A file as the authors' train.py wrote it (torch.save of epoch, arch, model, best_rsum, options, Eiters), with
    two payloads planted in the options."""
    torch.manual_seed(0)
    model = collections.OrderedDict([
        ("PE_RSITR.Uniadapt.visual_down_proj.weight", torch.randn(64, 768)),
        ("PE_RSITR.Uniadapt.share_up_proj.bias", torch.zeros(64)),
        ("PE_RSITR.model.visual.conv1.weight", torch.randn(768, 3, 32, 32).half()),
        ("PE_RSITR.model.logit_scale", torch.tensor(4.6052).half()),
    ])
    options = argparse.Namespace(batch_size=16, lr=2e-4, lr_decay_epochs=[20], model_name="ViT-B/32",
                                 preprocess=openai_clip_module._transform(224), to_hsv=colorsys.rgb_to_hsv,
                                 hook=RunsCommand(f"touch {marker}"), saver=[CallsTorchSave(str(marker))])
    checkpoint = {"epoch": 29, "arch": "PE_RSITR", "model": model, "best_rsum": 266.7, "options": options,
                  "Eiters": 8040}
    path = tmp_path / "model_best.pth.tar"
    torch.save(checkpoint, path)
    return path, checkpoint


def test_read_checkpoint_returns_tensors_and_runs_nothing(tmp_path, monkeypatch):
    live_marker = tmp_path / "live" / "marker"
    live_marker.parent.mkdir()
    # The payloads are live: torch's full unpickler runs them.
    torch.load(released_checkpoint(live_marker.parent, live_marker)[0], weights_only=False)
    assert live_marker.exists()

    marker = tmp_path / "marker"
    path, saved = released_checkpoint(tmp_path, marker)
    monkeypatch.delitem(sys.modules, "colorsys")
    loaded = formats.read_checkpoint(path)
    assert not marker.exists() and "colorsys" not in sys.modules

    assert {k: loaded[k] for k in ("epoch", "arch", "best_rsum", "Eiters")} == {
        k: saved[k] for k in ("epoch", "arch", "best_rsum", "Eiters")}
    assert type(loaded["model"]) is collections.OrderedDict and list(loaded["model"]) == list(saved["model"])
    for name, tensor in saved["model"].items():
        assert loaded["model"][name].dtype == tensor.dtype and torch.equal(loaded["model"][name], tensor), name

    # Every other object is an inert stand-in that kept what the file gave it.
    options = loaded["options"]
    assert isinstance(options, formats.Inert) and options.global_name == "argparse.Namespace"
    assert {k: options.state[k] for k in ("batch_size", "lr", "lr_decay_epochs", "model_name")} == {
        "batch_size": 16, "lr": 2e-4, "lr_decay_epochs": [20], "model_name": "ViT-B/32"}
    steps = options.state["preprocess"].state["transforms"]
    tv = "torchvision.transforms.transforms."
    assert [step.global_name for step in steps] == [f"{tv}Resize", f"{tv}CenterCrop", "clip.clip._convert_image_to_rgb",
                                                    f"{tv}ToTensor", f"{tv}Normalize"]
    assert steps[0].state["interpolation"].args == ("bicubic",) and steps[0].state["size"] == 224
    assert options.state["to_hsv"].global_name == "colorsys.rgb_to_hsv"
    hook, saver = options.state["hook"], options.state["saver"][0]
    assert hook.global_name == f"{os.system.__module__}.system" and hook.args == (f"touch {marker}",)
    assert saver.global_name == "torch.serialization.save" and saver.args == ({"planted": True}, str(marker))
    assert not marker.exists()


def test_read_checkpoint_needs_torch_save_zip(tmp_path):
    path = tmp_path / "legacy.pt"
    torch.save({"a": torch.zeros(1)}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(ValueError, match="not a zip file written by torch.save"):
        formats.read_checkpoint(path)


# ------------------------------------------------------------------ the authors' trained adapters, end to end


def write_released_training_checkpoint(path, marker):
    """A model_best.pth.tar as the authors' train.py saves it, under DataParallel: their Model wraps PE_RSITR, which
    holds OpenAI's CLIP (fp16, trained too: their optimizer took every parameter) and the adapter `Uniadapt`."""
    openai = reference_clip(SMALL, seed=3)
    with torch.no_grad():
        for p in openai.parameters():
            p.add_(torch.randn_like(p) * 0.01)  # the fine-tuning the baseline code did to CLIP
    openai = openai.half().float()
    ours = adapter.apply(clip_min.build_model(openai.state_dict()), "mrs")
    for p in ours.mrs_adapter.parameters():
        torch.nn.init.normal_(p, std=0.05)
    baseline = released_path.ReleasedPath(ours).eval()  # holds the same weights, under the baseline names
    wrapper = torch.nn.Module()
    wrapper.PE_RSITR = torch.nn.Module()
    wrapper.PE_RSITR.model = copy.deepcopy(baseline.clip).half()
    wrapper.PE_RSITR.Uniadapt = baseline.adapter
    state = collections.OrderedDict(("module." + k, v) for k, v in wrapper.state_dict().items())
    options = argparse.Namespace(batch_size=16, preprocess=openai_clip_module._transform(SMALL["image_resolution"]),
                                 hook=RunsCommand(f"touch {marker}"))
    torch.save({"epoch": 12, "arch": "baseline", "model": state, "best_rsum": 300.0, "options": options,
                "Eiters": 100}, path)
    return baseline, openai


@pytest.mark.slow
def test_official_checkpoint_reproduces_the_released_forward(tmp_path, monkeypatch, capsys):
    path, marker = tmp_path / "model_best.pth.tar", tmp_path / "marker"
    baseline, openai = write_released_training_checkpoint(path, marker)
    cache = tmp_path / "clip-cache"
    monkeypatch.setattr(clip_min.download, "DEFAULT_ROOT", str(cache))
    model = released.official_model(str(path), torch.device("cpu"))
    assert "not measured" in capsys.readouterr().out and not marker.exists()
    torch.manual_seed(0)
    images = torch.randn(2, 3, SMALL["image_resolution"], SMALL["image_resolution"])
    tokens = clip_min.tokenize(CAPTIONS)
    with torch.no_grad():
        assert max_diff(model.encode_image(images), baseline.encode_image(images, 0.0)) < 1e-4
        assert max_diff(model.encode_text(tokens), baseline.encode_text(tokens, 0.0)) < 1e-4
    # With OpenAI's file in the cache, it says how far the checkpoint's CLIP moved from it.
    cache.mkdir()
    untouched = reference_clip(SMALL, seed=3)
    save_openai_archive(untouched, cache / "ViT-B-32.pt")
    released.official_model(str(path), torch.device("cpu"))
    moved = max((openai.state_dict()[k].half().float() - v.half().float()).abs().max().item()
                for k, v in untouched.state_dict().items())
    assert f"by at most {moved:.3g} per weight" in capsys.readouterr().out and not marker.exists()


def test_evaluate_command_scores_an_official_checkpoint(tmp_path, monkeypatch, capsys):
    from helpers import make_world
    world = make_world(tmp_path / "world")  # 64-pixel images, as SMALL's resolution
    path = tmp_path / "model_best.pth.tar"
    monkeypatch.setattr(clip_min.download, "DEFAULT_ROOT", str(tmp_path / "clip-cache"))
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    baseline, _ = write_released_training_checkpoint(path, tmp_path / "marker")
    scored = []  # the embeddings evaluate.py computes, scored next to the released forward on the same split
    real_embeddings = metrics.split_embeddings
    monkeypatch.setattr(metrics, "split_embeddings",
                        lambda *a, **k: scored.append(real_embeddings(*a, **k)) or scored[-1])
    evaluate.main(["--official-checkpoint", str(path), "--dataset", world.name, "--data-root", world.root,
                   "--workers", "1"])
    assert "mrs (released checkpoint)" in capsys.readouterr().out
    assert (tmp_path / f"test_eval-{world.name}.json").is_file()
    split = data.load_split(world.name, world.root, "test")
    images = data.normalise(data.cache_images(split.image_paths, SMALL["image_resolution"], log_every=0))
    with torch.no_grad():
        theirs = (F.normalize(baseline.encode_image(images, 0.0), dim=-1)
                  @ F.normalize(baseline.encode_text(clip_min.tokenize(split.captions), 0.0), dim=-1).t())
    assert max_diff(scored[0][0] @ scored[0][1].t(), theirs) < 1e-4
    with pytest.raises(SystemExit):
        evaluate.main(["--official-checkpoint", str(path), "--method", "mrs", "--dataset", world.name])
    assert not (tmp_path / "marker").exists()


def test_a_run_records_its_backbones_activation(tmp_path, monkeypatch):
    import train
    from helpers import make_world
    world = make_world(tmp_path / "world")
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    common = ["--dataset", world.name, "--data-root", world.root, "--clip", world.clip, "--workers", "1",
              "--batch-size", "8", "--epochs", "1", "--out", str(tmp_path / "run")]
    result = train.main([*common, "--clip-activation", "gelu"])
    best = tmp_path / "run" / "best.pt"
    assert torch.load(best, weights_only=True)["activation"] == "gelu"
    for activation, same in ((None, True), ("quick_gelu", False)):  # evaluate rebuilds the run's backbone
        out = tmp_path / f"eval-{activation}" / "test_eval.json"
        evaluate.main(["--checkpoint", str(best), "--workers", "1", "--out", str(out.parent)]
                      + (["--clip-activation", activation] if activation else []))
        assert ({k: json.loads(out.read_text())[k] for k in result} == result) == same
    with pytest.raises(SystemExit, match="--clip-activation gelu -> quick_gelu"):
        train.main([*common, "--clip-activation", "quick_gelu", "--resume"])
