"""timm-native models: pretrained_cfg, classifier reset, local weights through create_model, timm's data pipeline."""

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data import create_dataset, create_loader, create_transform, resolve_data_config

import tokennas
from tokennas.cli import main
from tokennas.data import FASHION_MNIST_DIR, load_data, read_idx
from tokennas.train import save_checkpoint

SEARCHED = Path(__file__).parents[1] / "results/example/best/03-trial19-10.9M.yaml"  # a config found by a search
FASHION_MNIST = (0.2860,), (0.3530,)


def _cli(*args: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 0


@pytest.mark.parametrize("name", ["deit_tiny", "hvt_ti_1", "psvit_2d_tiny", "crossvit_tiny", "crossvit_9_dagger",
                                  "quadformer_s_256_100", "stt_tiny"])  # every family and stem
def test_presets_are_timm_native(name):
    config = tokennas.load_config(name)
    model = tokennas.build_model(config)
    cfg = model.pretrained_cfg
    assert cfg["input_size"] == (config.in_chans, config.img_size, config.img_size)
    assert cfg["num_classes"] == config.num_classes
    names = dict(model.named_modules())
    for layer in np.atleast_1d(cfg["first_conv"]).tolist() + np.atleast_1d(cfg["classifier"]).tolist():
        assert layer in names, layer
    assert model.get_classifier() is model.head
    model.reset_classifier(7)
    assert model.num_classes == 7 and model.pretrained_cfg["num_classes"] == config.num_classes  # the weights'


@pytest.mark.parametrize("name", ["deit_tiny", "crossvit_tiny", "stt_tiny"])
def test_reset_classifier_changes_the_output(name):
    config = tokennas.load_config(name)
    small = dict(img_size=config.img_size, in_chans=1, num_classes=10)
    model = timm.create_model(f"tokennas_{name}", **small).eval()
    x = torch.randn(2, *model.pretrained_cfg["input_size"])
    model.reset_classifier(0)
    features = model(x)
    assert features.shape == model.forward_head(model.forward_features(x), pre_logits=True).shape
    model.reset_classifier(4)
    assert model(x).shape == (2, 4)


def test_resolve_data_config_for_a_preset_a_searched_config_and_a_checkpoint(tmp_path):
    preset = timm.create_model("tokennas_deit_tiny", img_size=32, patch_size=4, in_chans=1, num_classes=10)
    expected = {"input_size": (1, 32, 32), "mean": FASHION_MNIST[0], "std": FASHION_MNIST[1]}
    assert resolve_data_config({}, model=preset).items() >= expected.items()
    imagenet = resolve_data_config({}, model=timm.create_model("tokennas_deit_small"))
    assert (imagenet["input_size"], imagenet["mean"]) == ((3, 224, 224), timm.data.IMAGENET_DEFAULT_MEAN)

    searched = timm.create_model("tokennas_config", config=str(SEARCHED))
    config = tokennas.load_config(SEARCHED)
    assert resolve_data_config({}, model=searched)["input_size"] == (1, config.img_size, config.img_size)
    assert resolve_data_config({}, model=searched)["mean"] == FASHION_MNIST[0]

    # a checkpoint carries the data config it was trained with, and it wins over the default
    save_checkpoint(tokennas.build_model(config), config, tmp_path / "checkpoint.pt",
                    data_config={"mean": (0.5,), "std": (0.25,), "crop_pct": 1.0})
    trained = timm.create_model("tokennas_config", config=str(tmp_path / "checkpoint.pt"), pretrained=True)
    data = resolve_data_config({}, model=trained)
    assert (data["input_size"], data["mean"], data["std"]) == ((1, 32, 32), (0.5,), (0.25,))


def test_create_model_loads_a_checkpoint_and_a_state_dict(tmp_path):
    config = tokennas.load_config("deit_tiny").replace(img_size=32, patch_size=4, in_chans=1, num_classes=10,
                                                       depth=2)
    reference = tokennas.build_model(config).eval()
    save_checkpoint(reference, config, tmp_path / "checkpoint.pt", metrics={"test_acc": 0.5})
    torch.save(reference.state_dict(), tmp_path / "weights.pth")
    x = torch.randn(3, 1, 32, 32)
    expected = reference(x)

    # the checkpoint fixes image size, channels and classes; the preset's other fields must be given
    from_checkpoint = timm.create_model("tokennas_deit_tiny", pretrained=True, depth=2, patch_size=4,
                                        pretrained_cfg_overlay=dict(file=str(tmp_path / "checkpoint.pt")))
    assert torch.equal(from_checkpoint.eval()(x), expected)
    plain = timm.create_model("tokennas_deit_tiny", pretrained=True, depth=2, patch_size=4, img_size=32, in_chans=1,
                              num_classes=10, pretrained_cfg_overlay=dict(file=str(tmp_path / "weights.pth")))
    assert torch.equal(plain.eval()(x), expected)
    whole = timm.create_model("tokennas_config", config=str(tmp_path / "checkpoint.pt"), pretrained=True)
    assert torch.equal(whole.eval()(x), expected)
    # fine-tuning: another number of classes drops the classifier, as for any timm model
    fresh_head = timm.create_model("tokennas_config", config=str(tmp_path / "checkpoint.pt"), pretrained=True,
                                   num_classes=3)
    assert fresh_head.num_classes == 3
    kept = "blocks.1.mlp.fc2.weight"
    assert torch.equal(fresh_head.state_dict()[kept], reference.state_dict()[kept])

    with pytest.raises(ValueError, match="depth=2"):
        timm.create_model("tokennas_deit_tiny", pretrained=True, patch_size=4,
                          pretrained_cfg_overlay=dict(file=str(tmp_path / "checkpoint.pt")))
    with pytest.raises(ValueError, match="ships no weights"):
        timm.create_model("tokennas_deit_tiny", pretrained=True)


def test_a_timm_vit_state_dict_loads_and_adapts_like_timm(tmp_path):
    vit = timm.create_model("deit_tiny_patch16_224").eval()
    torch.save(vit.state_dict(), tmp_path / "deit.pth")
    ours = timm.create_model("tokennas_deit_tiny", pretrained=True,
                             pretrained_cfg_overlay=dict(file=str(tmp_path / "deit.pth"))).eval()
    x = torch.randn(2, 3, 224, 224)
    assert torch.allclose(ours(x), vit(x), atol=1e-5)
    # a grey-scale, 10-class model from the same weights: timm sums the RGB filters and drops the head
    gray = timm.create_model("tokennas_deit_tiny", pretrained=True, in_chans=1, num_classes=10,
                             pretrained_cfg_overlay=dict(file=str(tmp_path / "deit.pth"), input_size=(3, 224, 224),
                                                         num_classes=1000))
    assert torch.allclose(gray.patch_embed.proj.weight, vit.patch_embed.proj.weight.sum(1, keepdim=True))


@pytest.fixture(scope="module")
def fashion_folder(tmp_path_factory):
    """Fashion-MNIST test images as PNGs: 40 per class to train on, 20 per class to evaluate."""
    if not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Fashion-MNIST IDX files not installed (make setup)")
    root = tmp_path_factory.mktemp("fashion-folder")
    images = read_idx(FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz")
    labels = read_idx(FASHION_MNIST_DIR / "t10k-labels-idx1-ubyte.gz")
    for label in range(10):
        chosen = np.flatnonzero(labels == label)[:60]
        for split, indices in (("train", chosen[:40]), ("validation", chosen[40:])):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in indices:
                Image.fromarray(images[i]).save(folder / f"{i}.png")
    return root


def test_timm_pipeline_reproduces_tokennas_train_accuracy(fashion_folder, tmp_path):
    config = tokennas.load_config(SEARCHED).replace(in_chans=3)  # timm's folder reader gives RGB
    tokennas.save_config(config, tmp_path / "searched.yaml")
    out = tmp_path / "train"
    _cli("train", str(tmp_path / "searched.yaml"), "--dataset", "folder", "--data-dir", str(fashion_folder),
         "--epochs", "2", "--batch-size", "32", "--out", str(out))
    reported = json.loads((out / "metrics.json").read_text())["test_acc"]

    model = timm.create_model("tokennas_config", config=str(out / "checkpoint.pt"), pretrained=True).eval()
    data_config = resolve_data_config({}, model=model)
    dataset = create_dataset("", root=str(fashion_folder), split="validation")
    loader = create_loader(dataset, batch_size=50, use_prefetcher=False, num_workers=0, **data_config)
    # the same preprocessing function, with the same arguments, as tokennas train's evaluation
    ours = load_data("folder", fashion_folder, config.img_size, with_test=True).test.transform
    assert repr(loader.dataset.transform) == repr(ours) == repr(create_transform(**data_config))
    correct = 0
    with torch.no_grad():
        for images, labels in loader:
            correct += (model(images).argmax(-1) == labels).sum().item()
    assert len(dataset) == 200
    assert abs(correct - reported * len(dataset)) <= 1
    assert correct > 20 + 10  # above chance (10%): the checkpoint's weights are in use
