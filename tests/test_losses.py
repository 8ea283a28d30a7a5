"""The router's losses (issue 12): the balancing loss in its three scopes and the z-loss against float64 loops of
their formulas, where their gradients go, and how the models weigh them into `loss`."""

import pytest
import torch

import moelab
from moelab import GlobalLoad, MoEConfig, MoEModelConfig, RouterOutput, SparseMoE, load_balancing_loss, router_z_loss


def routing(T=12, E=4, k=2, seed=0, sigmoid=False):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g) * 2
    probs = torch.sigmoid(logits) if sigmoid else torch.softmax(logits, -1)
    weights, index = torch.topk(probs, k, dim=-1)
    return RouterOutput(logits, probs, index, weights, torch.zeros(T, k, dtype=torch.bool))


def float64_balance(probs, index, E, keep=None):
    """E * sum_e f_e P_e by loops, each token's scores normalised to sum to 1."""
    T, k = index.shape
    keep = [True] * T if keep is None else keep
    tokens = [t for t in range(T) if keep[t]]
    f = [sum(int(index[t, j]) == e for t in tokens for j in range(k)) / (len(tokens) * k) for e in range(E)]
    P = [sum(float(probs[t, e]) / float(probs[t].double().sum()) for t in tokens) / len(tokens) for e in range(E)]
    return E * sum(fe * pe for fe, pe in zip(f, P))


@pytest.mark.parametrize("sigmoid", [False, True])
def test_the_batch_loss_equals_the_float64_formula(sigmoid):
    r = routing(sigmoid=sigmoid)
    assert load_balancing_loss(r).item() == pytest.approx(float64_balance(r.router_probs, r.top_k_index, 4), rel=1e-6)


@pytest.mark.parametrize("sigmoid", [False, True])
def test_a_balanced_router_scores_one(sigmoid):
    T, E, k = 8, 4, 2
    probs = torch.full((T, E), 0.3 if sigmoid else 1 / E)  # sigmoid scores need not sum to 1
    index = torch.arange(T * k).remainder(E).view(T, k)
    r = RouterOutput(torch.zeros(T, E), probs, index, torch.full((T, k), 0.5))
    assert load_balancing_loss(r).item() == pytest.approx(1.0)


def test_the_ignore_mask_leaves_tokens_out():
    r = routing(T=10)
    ignore = torch.tensor([False, True, False, False, True, False, False, False, True, False])
    expected = float64_balance(r.router_probs, r.top_k_index, 4, keep=(~ignore).tolist())
    assert load_balancing_loss(r, ignore_mask=ignore).item() == pytest.approx(expected, rel=1e-6)
    kept = RouterOutput(*(t[~ignore] for t in r))
    assert load_balancing_loss(kept).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="ignore_mask must be a bool tensor"):
        load_balancing_loss(r, ignore_mask=torch.zeros(10))


def test_the_sequence_loss_is_the_mean_of_per_sequence_losses_and_the_batch_loss_at_one_sequence():
    r = routing(T=12)
    per_sequence = [float64_balance(r.router_probs[b * 4:(b + 1) * 4], r.top_k_index[b * 4:(b + 1) * 4], 4)
                    for b in range(3)]
    got = load_balancing_loss(r, scope="sequence", batch_size=3).item()
    assert got == pytest.approx(sum(per_sequence) / 3, rel=1e-6)
    assert load_balancing_loss(r, scope="sequence", batch_size=1).item() == pytest.approx(
        load_balancing_loss(r).item(), rel=1e-6)
    with pytest.raises(ValueError, match="batch_size"):
        load_balancing_loss(r, scope="sequence", batch_size=5)


def test_the_global_loss_takes_f_from_the_global_counts():
    first, second = routing(T=6, seed=1), routing(T=6, seed=2)
    load = GlobalLoad()
    load.add(0, first.top_k_index, 4)
    counts = load.add(0, second.top_k_index, 4)
    both = torch.cat([first.top_k_index, second.top_k_index])
    assert torch.equal(counts, torch.bincount(both.reshape(-1), minlength=4))
    f = counts.double() / counts.sum()
    P = (second.router_probs.double() / second.router_probs.double().sum(-1, keepdim=True)).mean(0)
    got = load_balancing_loss(second, scope="global", tokens_per_expert=counts)
    assert got.item() == pytest.approx(4 * float((f * P).sum()), rel=1e-6)
    with pytest.raises(ValueError, match="tokens_per_expert"):
        load_balancing_loss(second, scope="global")
    with pytest.raises(ValueError, match="scope must be one of"):
        load_balancing_loss(second, scope="micro")


def test_the_z_loss_equals_the_float64_formula():
    r = routing()
    expected = sum(float(torch.logsumexp(row.double(), 0)) ** 2 for row in r.router_logits) / 12
    assert router_z_loss(r.router_logits).item() == pytest.approx(expected, rel=1e-6)
    assert router_z_loss(r).item() == pytest.approx(expected, rel=1e-6)
    ignore = torch.arange(12) % 3 == 0
    kept = sum(float(torch.logsumexp(r.router_logits[t].double(), 0)) ** 2 for t in range(12) if t % 3) / 8
    assert router_z_loss(r.router_logits, ignore).item() == pytest.approx(kept, rel=1e-6)


def test_the_aux_loss_gradient_reaches_the_router_weights_only():
    cfg = MoEConfig(hidden_size=16, intermediate_size=8, num_experts=4, top_k=2, shared_expert_intermediate_size=8)
    moe = SparseMoE(cfg, "grouped_mm", seed=0)
    x = torch.randn(10, 16, requires_grad=True)
    out, r = moe(x, return_router_output=True)
    (out.sum() * 0 + r.router_probs.sum() * 0 + load_balancing_loss(r)).backward()
    assert moe.router.weight.grad.abs().sum() > 0
    for name, p in moe.named_parameters():
        if name != "router.weight":
            assert p.grad is None or not p.grad.any(), name


def model(**fields):
    moe = MoEConfig(hidden_size=32, intermediate_size=16, num_experts=4, top_k=2)
    return moelab.MoEForCausalLM(MoEModelConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=2, moe=moe, **fields), "eager", seed=0)


def test_the_models_sum_the_router_losses_over_layers_and_weigh_them_into_loss():
    ids = torch.randint(0, 32, (3, 8), generator=torch.Generator().manual_seed(0))
    plain = model()(ids, labels=ids)
    assert torch.equal(plain.loss, plain.lm_loss)  # coefficients 0: today's loss
    assert plain.router_outputs is None
    weighed = model(router_aux_loss_coef=0.01, router_z_loss_coef=0.001)(ids, labels=ids, output_router_logits=True)
    assert len(weighed.router_outputs) == 2 and weighed.router_logits[0].shape == (24, 4)
    aux = sum(load_balancing_loss(r) for r in weighed.router_outputs)
    z = sum(router_z_loss(r.router_logits) for r in weighed.router_outputs)
    assert torch.allclose(weighed.aux_loss, aux) and torch.allclose(weighed.z_loss, z)
    assert torch.allclose(weighed.loss, weighed.lm_loss + 0.01 * aux + 0.001 * z)
    sequence = model(router_aux_loss_scope="sequence")(ids, labels=ids, output_router_logits=True)
    expected = sum(load_balancing_loss(r, scope="sequence", batch_size=3) for r in sequence.router_outputs)
    assert torch.allclose(sequence.aux_loss, expected)
    no_labels = model()(ids, output_router_logits=True)
    assert no_labels.loss is None and no_labels.aux_loss is not None


def test_the_global_scope_accumulates_over_micro_batches():
    m = model(router_aux_loss_scope="global", router_aux_loss_coef=0.01)
    ids = torch.randint(0, 32, (4, 8), generator=torch.Generator().manual_seed(1))
    load = GlobalLoad()
    m(ids[:2], labels=ids[:2], global_load=load)
    second = m(ids[2:], labels=ids[2:], global_load=load, output_router_logits=True)
    whole = m(ids, output_router_logits=True)
    for layer, r in enumerate(whole.router_outputs):
        assert torch.equal(load.tokens_per_expert[layer], torch.bincount(r.top_k_index.reshape(-1), minlength=4))
    expected = sum(load_balancing_loss(r, scope="global", tokens_per_expert=load.tokens_per_expert[layer])
                   for layer, r in enumerate(second.router_outputs))
    assert torch.allclose(second.aux_loss, expected)


@pytest.mark.parametrize("field, value", [("router_aux_loss_coef", -1.0), ("router_z_loss_coef", float("nan")),
                                          ("router_aux_loss_scope", "micro")])
def test_bad_loss_fields_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        model(**{field: value})
