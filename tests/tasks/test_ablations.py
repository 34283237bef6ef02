"""The cell-sentence feature encoding of the Fig. 2 ablation (its run is in the suite test)."""

import numpy as np
import scipy.sparse as sp

from scmmgpt.tasks.ablations import sentence_features


def test_sentence_features_keep_only_names_and_order():
    x = sp.csr_matrix(np.array([[0, 9.0, 1.0, 5.0], [2.0, 0, 0, 0]], dtype=np.float32))
    f = sentence_features(x, 2).toarray()
    np.testing.assert_allclose(f, [[0, 1.0, 0, 0.5], [1.0, 0, 0, 0]])
    # values do not matter beyond their order
    np.testing.assert_allclose(sentence_features(x.multiply(3).tocsr(), 2).toarray(), f)
