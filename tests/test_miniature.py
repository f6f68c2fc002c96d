"""The miniature: the committed mini CLIP, the pretraining's OpenAI-format output, and the table's statistics."""
import zipfile

import numpy as np
import pytest
import torch

import clip_min
import evaluate
import miniature

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit:FutureWarning")


def test_committed_checkpoint_loads_with_the_mini_architecture():
    assert zipfile.is_zipfile(evaluate.DEMO_CLIP), "assets/mini-clip.pt must be a TorchScript archive"
    model, preprocess = clip_min.load(evaluate.DEMO_CLIP)
    assert model.config == miniature.MINI_CONFIG
    assert list(model.state_dict()) == list(clip_min.CLIP(miniature.MINI_CONFIG).state_dict())
    # OpenAI's format: the archive itself stores fp16 weights (torch.jit.load is fine on our own file).
    stored = torch.jit.load(evaluate.DEMO_CLIP, map_location="cpu").state_dict()
    assert all(v.dtype == torch.float16 for v in stored.values())
    image = torch.randn(2, 3, 64, 64)
    features = model.encode_image(image)
    assert features.shape == (2, miniature.MINI_CONFIG.embed_dim) and torch.isfinite(features).all()


def test_tiny_pretrain_writes_an_archive_that_loads_back(tmp_path):
    def run(out):
        return miniature.pretrain(out=out, steps=3, batch_size=4, n_train=8, n_test=2, root=tmp_path, log_every=1)

    model, metrics = run(tmp_path / "a.pt")
    assert set(metrics) == {"i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "mR"}
    torch.manual_seed(0)
    initial = clip_min.CLIP(miniature.MINI_CONFIG).state_dict()
    assert not torch.equal(initial["visual.conv1.weight"], model.visual.conv1.weight), "pretraining changed nothing"

    loaded = clip_min.load(str(tmp_path / "a.pt"))[0]
    # The file holds exactly the trained weights rounded to fp16 ...
    for name, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value.half().float()), name
    # ... so it computes what the in-memory model computes, up to that rounding.
    torch.manual_seed(1)
    image, text = torch.randn(3, 3, 64, 64), clip_min.tokenize(["two red houses", "a lake", "a road on the left"])
    with torch.no_grad():
        for encode in ("encode_image", "encode_text"):
            args = (image,) if encode == "encode_image" else (text,)
            expected, actual = getattr(model, encode)(*args), getattr(loaded, encode)(*args)
            torch.testing.assert_close(actual, expected, atol=2e-2 * expected.abs().max().item(), rtol=2e-2)

    # Seeded: a second run gives the same weights.
    again, _ = run(tmp_path / "b.pt")
    for name, value in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], value), name


def test_summarise_gives_mean_and_sample_std_over_seeds():
    rng = np.random.default_rng(0)
    results = []
    for method, loss in (("mrs", "hmmc"), ("lora", "hmmc"), ("mrs", "infonce")):
        for seed in range(3):
            metrics = {k: float(rng.uniform(0, 100)) for k in miniature.METRICS}
            results.append(dict(method=method, loss=loss, name=f"{method}/{loss}", seed=seed, params=1000,
                                seconds=float(rng.uniform(1, 9)), metrics=metrics))
    results.append(dict(method="zeroshot", loss="hmmc", name="zero", seed=0, params=0, seconds=1.0,
                        metrics={k: 5.0 for k in miniature.METRICS}))
    rows = miniature.summarise(results)
    assert [(r["method"], r["loss"]) for r in rows] == [("mrs", "hmmc"), ("lora", "hmmc"), ("mrs", "infonce"),
                                                      ("zeroshot", "hmmc")]
    for row in rows[:3]:
        runs = [r for r in results if (r["method"], r["loss"]) == (row["method"], row["loss"])]
        assert row["seeds"] == 3
        for key in miniature.METRICS + ["seconds"]:
            values = np.array([r["metrics"][key] if key != "seconds" else r["seconds"] for r in runs])
            assert row["mean"][key] == pytest.approx(np.mean(values))
            assert row["std"][key] == pytest.approx(np.std(values, ddof=1))
    assert rows[3]["seeds"] == 1 and rows[3]["std"]["mR"] == 0.0 and rows[3]["mean"]["mR"] == 5.0

    table = miniature.markdown(rows, total_params=10_000).splitlines()
    assert len(table) == 2 + len(rows)
    first = rows[0]
    assert table[2].startswith("| mrs/hmmc | hmmc | 1,000 (10.00%) |")
    assert f"{first['mean']['mR']:.2f} ± {first['std']['mR']:.2f}" in table[2]
