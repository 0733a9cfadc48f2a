"""The sentiment head's refit: a penalised logistic regression, checked against a direct
minimisation of the same objective, and the head a finished run keeps."""
import numpy as np
import torch

import refit


def test_fit_linear_reaches_the_penalised_optimum_on_the_vectors_own_scale():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 6)) * 2
    labels = rng.integers(0, 3, 300)
    scale = np.array([1e-3, 1.0, 50.0, 0.2, 7.0, 1.0])   # features on very different scales
    vectors = (centres[labels] + rng.normal(size=(300, 6)) * 1.5) * scale + 3.0
    weight, bias = refit.fit_linear(vectors, labels, 3)

    # Reference: the same objective (mean cross-entropy + l2/2 (|w|^2 + |b|^2) on standardised
    # inputs) minimised by L-BFGS in float64.
    x = torch.tensor(vectors)
    z = (x - x.mean(0)) / (x.std(0, unbiased=False) + 1e-6)
    w = torch.zeros(6, 3, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([w, b], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14)
    target = torch.tensor(labels)

    def objective():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(z @ w + b, target) + refit.L2 / 2 * (w.square().sum() + b.square().sum())
        loss.backward()
        return loss

    optimizer.step(objective)
    expected = torch.softmax(z @ w + b, -1).detach().numpy()
    logits = vectors @ weight.T + bias   # the fit applies to raw vectors: standardisation folded in
    got = np.exp(logits - logits.max(1, keepdims=True))
    got /= got.sum(1, keepdims=True)
    np.testing.assert_allclose(got, expected, atol=2e-3)
    assert (got.argmax(1) == labels).mean() > 0.8


def test_a_refit_needs_two_labelled_sentiments():
    assert not refit.enough_labels(np.array([], np.int64))
    assert not refit.enough_labels(np.array([2, 2, 2, 2]))
    assert not refit.enough_labels(np.array([0, 0, 1]))
    assert refit.enough_labels(np.array([0, 0, 1, 1]))
