"""`--parent` files that cannot be a supernet's parent are refused in one line naming the file and the problem."""

import pytest
import torch

from tokennas.config import build_model
from tokennas.models.schedule_vit import ScheduleViTConfig
from tokennas.models.supernet import load_parent, parent_trunk
from tokennas.train import save_checkpoint

GREY = ScheduleViTConfig(img_size=32, in_chans=1, num_classes=10, patch_size=4, embed_dim=32, depth=2, num_heads=2)


def test_a_grey_tokennas_checkpoint_on_rgb_data_names_the_channels(tmp_path):
    path = save_checkpoint(build_model(GREY), GREY, tmp_path / "grey.pt")
    with pytest.raises(ValueError, match=r"grey\.pt.*takes 1 input channel\(s\) but the data has 3") as err:
        load_parent(path, 32, 3, 10)
    assert "\n" not in str(err.value)
    assert load_parent(path, 32, 1, 10).head_kept  # the data it was trained on still fits


def test_a_grey_state_dict_on_rgb_data_names_the_channels(tmp_path):
    torch.save(build_model(GREY).state_dict(), tmp_path / "grey.pth")
    with pytest.raises(ValueError, match=r"grey\.pth.*takes 1 input channel\(s\) but the data has 3"):
        load_parent(tmp_path / "grey.pth", 32, 3, 10)


def test_a_state_dict_without_blocks_is_refused(tmp_path):
    state = {k: v for k, v in build_model(GREY).state_dict().items() if not k.startswith("blocks.")}
    torch.save(state, tmp_path / "stem.pth")
    for read in (lambda p: load_parent(p, 32, 1, 10), parent_trunk):
        with pytest.raises(ValueError, match=r"stem\.pth.*no ViT blocks \(no 'blocks\.N\.' keys\)") as err:
            read(tmp_path / "stem.pth")
        assert "\n" not in str(err.value)
