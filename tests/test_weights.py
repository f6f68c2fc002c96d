"""Checkpoint download (cache, SHA-256 checks) and safe reading of OpenAI's TorchScript archives and state_dict files."""
import copy
import hashlib
import http.server
import os
import pickle
import socket
import threading
import types
import zipfile

import pytest
import torch
from PIL import Image

import clip_min
from clip_min import weights
from helpers import SMALL, reference_clip, save_openai_archive

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit:FutureWarning", "ignore:'torch.load' received a zip file")


@pytest.fixture(scope="module")
def reference():
    return reference_clip(SMALL)


@pytest.fixture(scope="module")
def archive(reference, tmp_path_factory):
    path = tmp_path_factory.mktemp("archive") / "model.pt"
    save_openai_archive(copy.deepcopy(reference), path)  # a copy: tracing shares the parameters, .half() changes them
    return path


def sha256_hex(data):
    return hashlib.sha256(data).hexdigest()


def assert_same_state_dict(ours, reference_state_dict):
    assert list(ours) == list(reference_state_dict)
    for name, expected in reference_state_dict.items():
        assert ours[name].dtype == expected.dtype == torch.float32, name
        assert ours[name].shape == expected.shape, name
        assert torch.equal(ours[name], expected), name


# ---------------------------------------------------------------------------------------------------- reading

def test_archive_has_openai_layout(archive):
    names = zipfile.ZipFile(archive).namelist()
    assert "model/data.pkl" in names and "model/constants.pkl" in names and "model/data/0" in names
    assert any(n.startswith("model/code/__torch__/") for n in names)


def test_reads_torchscript_archive_exactly(archive, reference):
    ours = weights.read_state_dict(archive)
    assert_same_state_dict(ours, reference.state_dict())
    # What TorchScript itself finds in the file (torch.jit.load is acceptable here, on a file the test wrote).
    stored = torch.jit.load(str(archive), map_location="cpu").state_dict()
    assert all(v.dtype == torch.float16 for v in stored.values())
    assert all(torch.equal(ours[k], v.float()) for k, v in stored.items())


@pytest.mark.parametrize("wrap", ["plain", "state_dict-key", "legacy-format"])
def test_reads_saved_state_dict(reference, tmp_path, wrap):
    half = {k: v.half() for k, v in reference.state_dict().items()}
    path = tmp_path / "weights.pt"
    if wrap == "plain":
        torch.save(half, path)
    elif wrap == "state_dict-key":
        torch.save({"state_dict": half, "epoch": 3}, path)
    else:
        torch.save(half, path, _use_new_zipfile_serialization=False)
    assert_same_state_dict(weights.read_state_dict(path), reference.state_dict())


def test_torch_load_refuses_torchscript_archives(archive):
    # The reason for the restricted reader: the safe torch.load cannot read OpenAI's files at all.
    with pytest.raises(RuntimeError, match="TorchScript"):
        torch.load(archive, map_location="cpu", weights_only=True)


def write_torchscript_zip(path, data_pkl):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("evil/data.pkl", data_pkl)
        z.writestr("evil/code/__torch__/model.py", "def forward(self):\n  pass\n")
        z.writestr("evil/constants.pkl", pickle.dumps(()))
        z.writestr("evil/version", "4\n")


def payload(kind, marker):
    # Protocol-0 pickles that call the named global; each is checked below to really create the marker.
    if kind == "os.system":
        return f"cos\nsystem\n(Vtouch {marker}\ntR.".encode()
    if kind == "builtins.eval":
        return f"cbuiltins\neval\n(Vopen({str(marker)!r}, 'w').close()\ntR.".encode()
    module, name = kind.rsplit(".", 1)  # a torch function that writes a file: torch.save(None, marker)
    return f"c{module}\n{name}\n(NV{marker}\ntR.".encode()


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval", "torch.save", "torch.serialization.save"])
def test_refuses_code_in_torchscript_archive(tmp_path, kind):
    live_marker = tmp_path / "live_marker"
    pickle.loads(payload(kind, live_marker))  # the payload is live: an ordinary unpickler runs it
    assert live_marker.exists()

    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    write_torchscript_zip(path, payload(kind, marker))
    with pytest.raises(pickle.UnpicklingError, match=f"refusing to load the global {kind}"):
        weights.read_state_dict(path)
    assert not marker.exists()


class Calls:
    """Pickles as a call of `function(*args)`, which unpickling it runs."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


@pytest.mark.parametrize("kind", ["os.system", "torch.save"])
def test_refuses_code_in_saved_file(tmp_path, kind):
    marker = tmp_path / "marker"
    call = Calls(os.system, f"touch {marker}") if kind == "os.system" else Calls(torch.save, None, str(marker))
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "hook": call}, path)
    with pytest.raises(ValueError, match="neither a TorchScript archive nor a state_dict"):
        weights.read_state_dict(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: the unrestricted loader runs it
    assert marker.exists()


def test_refuses_truncated_storage(archive, tmp_path):
    path = tmp_path / "truncated.pt"
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info, data[:-2] if info.filename == "model/data/1" else data)
    with pytest.raises(pickle.UnpicklingError, match="storage 1 holds"):
        weights.read_state_dict(path)


def test_missing_and_random_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        weights.read_state_dict(tmp_path / "nowhere.pt")
    path = tmp_path / "random.pt"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="random.pt is neither"):
        weights.read_state_dict(path)
    torch.save([torch.zeros(1)], path)
    with pytest.raises(ValueError, match="does not hold a state_dict"):
        weights.read_state_dict(path)


# ---------------------------------------------------------------------------------------------------- download

@pytest.fixture
def server(monkeypatch):
    """A loopback HTTP server: serve(path, body) -> URL; requests lists the paths asked for."""
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
    files, requests = {}, []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            if self.path not in files:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(files[self.path])))
            self.end_headers()
            self.wfile.write(files[self.path])

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()

    def url(path):
        return f"http://127.0.0.1:{httpd.server_port}{path}"

    def serve(path, body):
        files[path] = body
        return url(path)

    yield types.SimpleNamespace(serve=serve, url=url, requests=requests)
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def test_download_caches_verified_file(server, tmp_path, capfd):
    body = os.urandom(3 * 2**20 + 17)
    url = server.serve("/abc/model.pt", body)
    root = tmp_path / "cache"
    path = weights.download(url, sha256_hex(body).upper(), str(root))
    assert path == str(root / "model.pt") and open(path, "rb").read() == body
    assert os.listdir(root) == ["model.pt"]
    assert "Downloading model.pt: 3.0/3.0 MiB" in capfd.readouterr().err
    assert weights.download(url, sha256_hex(body), str(root)) == path
    assert server.requests == ["/abc/model.pt"]  # the second call was served from the cache


def test_download_with_wrong_hash_leaves_nothing(server, tmp_path):
    url = server.serve("/model.pt", b"not the weights")
    root = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="SHA-256 .* expected " + "0" * 64):
        weights.download(url, "0" * 64, str(root))
    assert os.listdir(root) == []


def test_corrupted_cache_is_downloaded_again(server, tmp_path, capfd):
    body = b"the real weights"
    url = server.serve("/model.pt", body)
    root = tmp_path / "cache"
    root.mkdir()
    (root / "model.pt").write_bytes(b"the real weigh")  # an interrupted copy, say
    path = weights.download(url, sha256_hex(body), str(root))
    assert open(path, "rb").read() == body and server.requests == ["/model.pt"]
    assert "does not match; downloading it again" in capfd.readouterr().err
    assert os.listdir(root) == ["model.pt"]


def test_network_errors_name_the_url(server, tmp_path):
    root = tmp_path / "cache"
    missing = server.url("/missing.pt")
    with pytest.raises(ConnectionError, match=f"could not download {missing}: HTTP Error 404"):
        weights.download(missing, "0" * 64, str(root))
    with socket.socket() as s:  # a loopback port bound but not listening: the connection is refused
        s.bind(("127.0.0.1", 0))
        unreachable = f"http://127.0.0.1:{s.getsockname()[1]}/model.pt"
        with pytest.raises(ConnectionError, match=f"could not download {unreachable}"):
            weights.download(unreachable, "0" * 64, str(root))
    assert os.listdir(root) == []


# ---------------------------------------------------------------------------------------------------- load

def test_model_table():
    assert clip_min.available_models() == ["ViT-B/32", "ViT-B/16", "ViT-L/14", "ViT-L/14@336px"]
    for url, sha256 in weights.MODELS.values():
        assert url.startswith("https://openaipublic.azureedge.net/clip/models/")
        assert url.split("/")[-2] == sha256 and len(sha256) == 64


def test_load_by_name_downloads_once(server, tmp_path, archive, reference, monkeypatch):
    body = archive.read_bytes()
    url = server.serve(f"/{sha256_hex(body)}/ViT-B-32.pt", body)
    monkeypatch.setitem(weights.MODELS, "ViT-B/32", (url, sha256_hex(body)))
    root = str(tmp_path / "cache")
    for _ in range(2):
        model, preprocess = clip_min.load("ViT-B/32", download_root=root)
        assert not model.training and model.visual.input_resolution == SMALL["image_resolution"]
        assert_same_state_dict(model.state_dict(), reference.state_dict())
        image = preprocess(Image.new("RGB", (100, 80), (200, 30, 90)))
        assert image.shape == (3, SMALL["image_resolution"], SMALL["image_resolution"])
    assert len(server.requests) == 1
    assert os.listdir(root) == ["ViT-B-32.pt"]


def test_load_unknown_name_lists_models(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'ViT-B/64'.*ViT-B/32.*ViT-L/14@336px"):
        clip_min.load("ViT-B/64", download_root=str(tmp_path))
