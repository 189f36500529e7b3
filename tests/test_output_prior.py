"""The output prior: every region's sigmoid starts at the set foreground probability."""

import pytest
import torch

from fedmodal.baselines.config import SegConfig
from fedmodal.nets.mixmfl import MixMFLNet
from fedmodal.nets.output_prior import apply_output_prior, prior_logit
from fedmodal.nets.segmentation import NamedSegmentationNet, SegmentationNet


def test_prior_logit_inverts_the_sigmoid_and_refuses_probabilities_outside_0_1():
    assert torch.sigmoid(torch.tensor(prior_logit(0.05))).item() == pytest.approx(0.05)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="output_prior"):
            prior_logit(bad)


@pytest.mark.parametrize(
    "net",
    [
        SegmentationNet(regions=("WT", "TC", "ET"), channels=(4, 8, 16), output_prior=0.05),
        SegmentationNet(arch="basicunet", regions=("WT",), channels=(4, 4, 8, 8, 16, 4), output_prior=0.05),
        MixMFLNet(features=(4, 8), output_prior=0.05),
    ],
    ids=["unet", "basicunet", "mixmfl"],
)
def test_a_blank_input_is_predicted_at_the_prior(net):
    # A constant input gives constant features after instance norm, so only the bias speaks.
    net.eval()
    with torch.no_grad():
        if isinstance(net, MixMFLNet):
            logits = net(torch.zeros(1, 4, 32, 32), ("t1", "flair"), decoupler=False).logits
        else:
            logits = net(torch.zeros(1, 8, 32, 32))
    assert torch.sigmoid(logits).mean().item() == pytest.approx(0.05, abs=0.02)


def test_without_a_prior_the_default_start_is_near_one_half():
    net = SegmentationNet(regions=("WT",), channels=(4, 8, 16)).eval()
    with torch.no_grad():
        assert torch.sigmoid(net(torch.zeros(1, 8, 32, 32))).mean().item() == pytest.approx(0.5, abs=0.1)


def test_a_layer_without_a_matching_output_bias_is_refused():
    with pytest.raises(ValueError, match="not the \\(3,\\) output bias"):
        apply_output_prior(torch.nn.Sequential(torch.nn.Linear(4, 2)), 3, 0.05)


def test_the_comparison_preset_carries_its_prior_through_config_and_checkpoint_spec():
    net = NamedSegmentationNet("unet2d-brats")
    assert net.config()["output_prior"] == 0.05
    assert SegmentationNet(**net.config()).config() == net.config()
    cfg = SegConfig(net="unet2d-brats")
    assert cfg.output_prior == 0.05 and cfg.net_args()["output_prior"] == 0.05
    assert SegConfig.from_net_args(net.config()).output_prior == 0.05
    # The other presets keep MONAI's initialisation (their measured tables were made with it).
    assert NamedSegmentationNet("unet2d-wt").config()["output_prior"] == 0.0


def test_fedmepd_softmax_heads_start_with_background_at_one_minus_the_prior():
    from fedmodal.fedmepd.config import FedMEPDConfig
    from fedmodal.nets.fedmepd import FedMEPDNet

    args = {**FedMEPDConfig(spatial_dims=2, channels=(4, 8, 8, 8), heads=(1, 1, 1, 1)).net_args()}
    assert args["output_prior"] == 0.05
    torch.manual_seed(0)  # the initial weights, so the result does not depend on the tests run before
    net = FedMEPDNet(**args).eval()
    with torch.no_grad():
        out = net(torch.zeros(1, 4, 32, 32), ("t1", "flair"))
    for logits in (out.logits, *out.aux.values()):
        probs = torch.softmax(logits, dim=1).mean(dim=(0, 2, 3))
        assert probs[0].item() == pytest.approx(0.95, abs=0.02)
        assert probs[1:].tolist() == pytest.approx([0.05 / 3] * 3, abs=0.01)
    assert FedMEPDNet(**net.config()).config() == net.config()


def test_a_softmax_prior_needs_a_class_bias():
    from fedmodal.nets.output_prior import apply_softmax_prior

    with pytest.raises(ValueError, match="softmax prior"):
        apply_softmax_prior(torch.nn.Linear(4, 1), 0.05)
    with pytest.raises(ValueError, match="output_prior"):
        apply_softmax_prior(torch.nn.Linear(4, 4), 1.5)
