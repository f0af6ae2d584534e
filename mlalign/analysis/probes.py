"""Linear probes on sentence representations (scikit-learn logistic regression), scored per sentence."""

from __future__ import annotations

import numpy as np


def probe_correct(train_x: np.ndarray, train_y, test_x: np.ndarray, test_y, seed: int = 0,
                  c: float = 1.0) -> np.ndarray:
    """[test sentences] 1.0 where a logistic-regression probe fit on (train_x, train_y) labels a test sentence right.

    Features are standardised with the training set's mean and spread (residual streams carry large constant
    components); multinomial logistic regression with L2 strength 1/c, lbfgs, deterministic given `seed`."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000, random_state=seed))
    probe.fit(np.asarray(train_x, dtype=np.float64), np.asarray(train_y))
    return (probe.predict(np.asarray(test_x, dtype=np.float64)) == np.asarray(test_y)).astype(float)


def chance_accuracy(train_y) -> float:
    """Accuracy of always answering the most frequent training label: what a probe without signal reaches."""
    _, counts = np.unique(np.asarray(train_y), return_counts=True)
    return float(counts.max() / counts.sum())
