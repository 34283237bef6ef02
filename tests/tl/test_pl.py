"""scmmgpt.pl returns matplotlib figures drawn from what tl wrote."""

import numpy as np
import pytest
from matplotlib.figure import Figure

from scmmgpt import pl, tl
from scmmgpt.errors import ConfigError, InputDataError


def test_plots(trained, test_cells):
    """Figures outside pyplot: no backend is chosen and nothing is left in pyplot's registry."""
    import sys

    a = test_cells
    tl.embed(a, trained.model)
    tl.annotate(a, trained.model, labels_key="cell_type")
    fig = pl.embedding(a, color=["cell_type", "scmmgpt_label"])
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    assert a.obsm["X_scmmgpt_aligned_umap"].shape == (a.n_obs, 2)
    # one scatter series per cell type present
    assert len(fig.axes[0].collections) == a.obs["cell_type"].nunique()
    # truth and prediction panels give each label one colour
    def colours(ax):
        return {c.get_label(): tuple(c.get_facecolor()[0]) for c in ax.collections}

    truth, pred = colours(fig.axes[0]), colours(fig.axes[1])
    assert set(truth) & set(pred) and all(truth[k] == pred[k] for k in set(truth) & set(pred))
    cm = pl.confusion_matrix(a, truth="cell_type")
    img = cm.axes[0].images[0].get_array()
    assert img.shape[0] == a.obs["cell_type"].nunique()
    np.testing.assert_allclose(np.asarray(img).sum(1), 1.0)       # rows normalised
    heat = pl.score_heatmap(a, groupby="cell_type")
    assert heat.axes[0].images[0].get_array().shape == (a.obs["cell_type"].nunique(), len(a.uns["scmmgpt_label"]["labels"]))
    types = sorted(set(a.obs["cell_type"].astype(str)))
    gen = tl.generate(trained.model, types)
    real = a.copy()
    real.X = np.log1p(1e4 * real.X.toarray() / real.X.toarray().sum(1, keepdims=True))
    fig = pl.real_vs_generated(real, gen, label_key="cell_type")
    stars = [c for c in fig.axes[0].collections if len(c.get_offsets()) and c.get_sizes()[0] > 100]
    assert sum(len(c.get_offsets()) for c in stars) == len(types)
    assert "matplotlib.pyplot" not in sys.modules or not sys.modules["matplotlib.pyplot"].get_fignums()
    with pytest.raises(InputDataError, match="tl.embed"):
        pl.embedding(a, basis="X_other", color="cell_type")
    with pytest.raises(InputDataError, match="no column"):
        pl.confusion_matrix(a, truth="nope")


def test_tl_never_moves_the_callers_model(trained, test_cells):
    """A model object is used on its own device; asking for another is an error, not a silent move."""
    model = trained.model
    with pytest.raises(ConfigError, match="model.to"):
        tl.embed(test_cells[:5].copy(), model, device="cuda")
    assert model.device.type == "cpu"
    assert tl.embed(test_cells[:5].copy(), model, device="cpu", copy=True) is not None
