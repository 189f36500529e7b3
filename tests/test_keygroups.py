"""fedmodal.fl.keygroups: each key group averaged over the sites allowed to send it."""

from __future__ import annotations

import numpy as np
import pytest
from nvflare.app_common.abstract.fl_model import FLModel

from fedmodal.fl.keygroups import (
    META_MODALITIES,
    META_NUM_SAMPLES,
    META_SITE,
    Contribution,
    KeyGroupAggregator,
    KeyGroupError,
    KeyGroups,
    aggregate,
)

GROUPS = KeyGroups()


def params(value: float, *modalities: str) -> dict:
    out = {"enc.shared.w": np.full(2, value), "dec.w": np.full(2, value)}
    out.update({f"enc.{m}.w": np.full(2, value) for m in modalities})
    return out


def test_groups_of_keys():
    assert GROUPS.group("enc.t1ce.conv.weight") == "t1ce"
    assert GROUPS.group("enc.t1.conv.weight") == "t1"  # "enc.t1." is not a prefix of "enc.t1ce."
    assert GROUPS.group("enc.shared.0.weight") == "enc.shared."
    assert GROUPS.group("dec.up.bias") == "dec."
    assert GROUPS.group("attention.q") is None


def test_a_tailored_encoder_averages_only_over_its_holders_weighted_by_samples():
    out = aggregate(
        [
            Contribution("site-2", params(3.0, "t2"), weight=30, modalities=("t1", "t2")),
            Contribution("site-1", params(1.0, "t1"), weight=10, modalities=("t1", "flair")),
            Contribution("site-3", params(5.0), weight=60, modalities=("flair",)),
        ],
        GROUPS,
    )
    np.testing.assert_allclose(out["enc.shared.w"], (10 * 1 + 30 * 3 + 60 * 5) / 100)
    np.testing.assert_allclose(out["dec.w"], 4.0)
    np.testing.assert_allclose(out["enc.t1.w"], 1.0)  # only site-1 sent t1: site-2 holds t1 but sent none
    np.testing.assert_allclose(out["enc.t2.w"], 3.0)  # never averaged with the sites lacking T2
    assert "enc.flair.w" not in out


def test_a_key_the_site_may_not_send_is_refused_naming_site_and_key():
    with pytest.raises(KeyGroupError, match=r"site site-1 \(holding \['t1'\]\) sent 'enc.t2.w', which belongs to t2"):
        aggregate([Contribution("site-1", params(1.0, "t2"), 5, ("t1",))], GROUPS)
    with pytest.raises(KeyGroupError, match="'attention.q', which is in no key group"):
        aggregate([Contribution("site-1", {"attention.q": np.zeros(1)}, 5, ("t1",))], GROUPS)
    with pytest.raises(KeyGroupError, match="of shape"):
        aggregate(
            [Contribution("a", {"dec.w": np.zeros(2)}, 1, ()), Contribution("b", {"dec.w": np.zeros(3)}, 1, ())], GROUPS
        )


def test_without_tailored_updating_every_encoder_averages_over_every_sender():
    out = aggregate(
        [Contribution("a", params(1.0, "t2"), 1, ("t1",)), Contribution("b", params(3.0, "t2"), 1, ("t2",))],
        GROUPS,
        over_holders_only=False,
    )
    np.testing.assert_allclose(out["enc.t2.w"], 2.0)


def test_the_nvflare_aggregator_reads_site_modalities_and_counts_from_meta():
    agg = KeyGroupAggregator()
    for site, value, mods, n in (("site-1", 1.0, ("t1",), 1), ("site-2", 4.0, ("t1", "t2"), 3)):
        meta = {META_SITE: site, META_MODALITIES: list(mods), META_NUM_SAMPLES: n}
        agg.accept_model(FLModel(params=params(value, *mods), meta=meta))
    result = agg.aggregate_model()
    np.testing.assert_allclose(result.params["enc.t1.w"], (1 + 12) / 4)
    np.testing.assert_allclose(result.params["enc.t2.w"], 4.0)
    assert result.meta["aggregated_sites"] == ["site-1", "site-2"]
    assert agg.contributions == []  # reset for the next round
    agg.accept_model(FLModel(params={}, meta={META_SITE: "site-1", META_NUM_SAMPLES: 1}))
    with pytest.raises(KeyGroupError, match="two results"):
        agg.accept_model(FLModel(params={}, meta={META_SITE: "site-1", META_NUM_SAMPLES: 1}))


def test_select_gives_a_site_exactly_its_groups():
    every = params(0.0, "t1", "t1ce", "t2", "flair")
    assert sorted(GROUPS.select(every, ("t1", "t2"))) == ["dec.w", "enc.shared.w", "enc.t1.w", "enc.t2.w"]
