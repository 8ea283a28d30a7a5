"""What the training notebooks claim, asserted on their seeded recipes (issue 12): collapse by construction, recovery
by the Switch loss and by the aux-loss-free bias, and specialisation on planted topics. Each run takes seconds."""

import pytest
import torch

from moelab.training import (balancing_run, normalized_mutual_information, specialisation_matrix,
                             specialisation_run, tilt_router, tiny_moe_lm)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny training steps run on one thread


@pytest.fixture(scope="module")
def runs():
    return {method: balancing_run(method) for method in ("none", "switch", "bias")}


def test_collapse_happens_by_construction_without_balancing(runs):
    run = runs["none"]
    assert run.after.num_pairs >= 4096
    shares = run.after.max_mean_load()  # the busiest expert's share over the uniform share, per layer
    assert max(shares) >= 2.0, shares
    busiest = [int(run.after.tokens_per_expert(layer).argmax()) for layer in range(2)]
    assert 0 in busiest  # the expert the routers were tilted towards


@pytest.mark.parametrize("method", ["switch", "bias"])
def test_balancing_recovers_from_the_collapse(runs, method):
    balanced = max(runs[method].after.max_mean_load())
    collapsed = max(runs["none"].after.max_mean_load())
    assert balanced <= 1.5 and balanced <= collapsed / 2, (method, balanced, collapsed)


def test_the_bias_run_balances_without_a_loss_term(runs):
    history = runs["bias"].history
    assert (history["aux_loss"] > 0).all()  # measured ...
    assert torch.equal(torch.tensor(history["loss"].values), torch.tensor(history["lm_loss"].values))  # ... not added
    biases = history.filter(like="bias/0/").iloc[-1]
    assert biases["bias/0/0"] == biases.min()  # the favoured expert was pushed down the most


def test_tilt_router_raises_the_mean_tokens_logit_by_the_offset():
    model = tiny_moe_lm(4, 1, seed=0)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    before = {name: moe.router.weight.detach().clone() for name, moe in model.moe_layers().items()}
    means = tilt_router(model, ids, expert=2, logit_offset=0.5)
    for name, moe in model.moe_layers().items():
        change = moe.router.weight.detach() - before[name]
        assert torch.allclose(change[2] @ means[name], torch.tensor(0.5), atol=1e-5)
        assert not change[[0, 1, 3]].any()
    with pytest.raises(ValueError, match="expert"):
        tilt_router(model, ids, expert=4)


def test_experts_specialise_on_planted_topics():
    run = specialisation_run()
    def nmi(sample, layer):
        counts = specialisation_matrix(sample.top_k_index[layer], sample.topics, 4, 4, sample.dropped[layer])
        return normalized_mutual_information(counts)
    best = max(range(2), key=lambda layer: nmi(run.after, layer))
    assert nmi(run.after, best) >= 0.3
    assert nmi(run.after, best) >= 3 * nmi(run.before, best)
