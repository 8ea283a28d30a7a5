"""moelab.training: the schedule, the trainer (accumulation, resume bit for bit, backends, expert bias), its config."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import moelab
from moelab.data import Batch, TokenDataset, text_corpus
from moelab.training import MAX_BATCH_TOKENS, MAX_TOKENS, Trainer, TrainingConfig, warmup_cosine
from moelab.training.history import BASE_COLUMNS


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny training steps run on one thread


@pytest.fixture(scope="module")
def corpus():
    return text_corpus()


def tiny_model(backend="eager", seed=0, aux=0.0, scope="batch", **moe):
    moe_config = moelab.MoEConfig(hidden_size=32, intermediate_size=64, num_experts=4, top_k=2, **moe)
    config = moelab.MoEModelConfig(vocab_size=256, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   max_position_embeddings=64, moe=moe_config, router_aux_loss_coef=aux,
                                   router_aux_loss_scope=scope)
    return moelab.MoEForCausalLM(config, backend, seed=seed)


def tiny_config(**kw):
    return TrainingConfig(**{"steps": 4, "batch_size": 4, "seq_len": 16, "lr": 1e-2, "warmup_steps": 1,
                             "progress": False, **kw})


class FixedRows(TokenDataset):
    """Hands out the rows of one tensor in order, whatever the generator: the same tokens however they are split
    into micro-batches (validation: the first rows)."""

    name, num_topics = "fixed", None

    def __init__(self, rows: torch.Tensor):
        self.rows, self.vocab_size, self.cursor = rows, 256, 0

    def _sample(self, split, batch_size, seq_len, generator):
        if split == "validation":
            return Batch(self.rows[:batch_size, :seq_len], None)
        batch = self.rows[self.cursor:self.cursor + batch_size, :seq_len]
        self.cursor += batch_size
        return Batch(batch, None)


# ------------------------------------------------------------------------------------------------ schedule


def test_schedule_is_warmup_then_cosine_to_the_floor():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=2.0)
    warmup, total, floor = 3, 10, 0.1
    scheduler = warmup_cosine(optimizer, warmup, total, floor)
    got = []
    for _ in range(total + 2):  # past the end the lr stays at the floor
        got.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    s = np.arange(total + 2, dtype=np.float64)
    progress = np.clip((s - warmup) / (total - warmup), 0.0, 1.0)
    expected = 2.0 * np.where(s < warmup, (s + 1) / warmup, floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * progress)))
    np.testing.assert_allclose(got, expected, rtol=1e-14, atol=0)
    assert got[warmup - 1] == got[warmup] == 2.0 and got[-1] == pytest.approx(2.0 * floor)


# ------------------------------------------------------------------------------------------------ trainer


def test_resume_continues_bit_for_bit(corpus, tmp_path):
    # every mechanism that draws or carries state: jitter (global RNG), expert bias, global-batch aux loss
    moe = {"router_jitter": 0.1, "expert_bias": True, "expert_bias_update_rate": 1e-2}
    config = tiny_config(steps=6, grad_accum=2, warmup_steps=2, eval_every=3)
    straight = Trainer(tiny_model(aux=0.01, scope="global", **moe), corpus, config)
    straight.train()

    first = Trainer(tiny_model(aux=0.01, scope="global", **moe), corpus, config)
    first.train(3)
    first.save_checkpoint(tmp_path / "ckpt")
    resumed = Trainer.resume(tmp_path / "ckpt", corpus)
    assert resumed.step == 3 and len(resumed.history) == 3
    resumed.train(3)

    for name, tensor in straight.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name
    a, b = straight.history, resumed.history
    assert list(a.columns) == list(b.columns)
    for column in ["loss", "lm_loss", "aux_loss", "z_loss", "lr", "grad_norm", "val_loss"] + \
            [c for c in a.columns if c.startswith(("load/", "bias/"))]:
        assert np.array_equal(a[column].to_numpy(), b[column].to_numpy(), equal_nan=True), column


def test_load_checkpoint_refuses_a_folder_without_state(corpus, tmp_path):
    trainer = Trainer(tiny_model(), corpus, tiny_config())
    trainer.model.save_pretrained(tmp_path / "model")
    with pytest.raises(FileNotFoundError, match="trainer_state.pt"):
        trainer.load_checkpoint(tmp_path)


def test_two_micro_batches_of_half_give_the_gradient_of_one_batch():
    rows = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(1))  # [B, S]
    grads, rows_out = [], []
    for batch_size, grad_accum in ((4, 1), (2, 2)):
        trainer = Trainer(tiny_model(), FixedRows(rows), tiny_config(steps=1, batch_size=batch_size,
                                                                     grad_accum=grad_accum, grad_clip=None))
        rows_out.append(trainer.train().iloc[0])
        grads.append({name: p.grad for name, p in trainer.model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert rows_out[1]["lm_loss"] == pytest.approx(rows_out[0]["lm_loss"], rel=1e-6)
    assert rows_out[1]["grad_norm"] == pytest.approx(rows_out[0]["grad_norm"], rel=1e-5)


def test_a_short_run_on_text_lowers_the_validation_loss(corpus):
    trainer = Trainer(tiny_model(), corpus, tiny_config(steps=40, batch_size=8, seq_len=32, warmup_steps=4))
    before = trainer.evaluate()
    history = trainer.train()
    assert history["step"].tolist() == list(range(1, 41))
    assert math.isnan(history["val_loss"].iloc[0]) and history["val_loss"].iloc[-1] == trainer.evaluate()
    assert trainer.evaluate() < before - 1.0  # from ~log(256) = 5.5 to below 4.5
    assert (history["tokens_per_s"] > 0).all()


def test_every_backend_trains_alike(corpus):
    losses = {}
    for backend in moelab.ExpertsInterface.names():
        history = Trainer(tiny_model(backend), corpus, tiny_config(steps=2)).train()
        assert np.isfinite(history[["loss", "grad_norm"]].to_numpy()).all(), backend
        losses[backend] = history["loss"].to_numpy()
    for backend, values in losses.items():
        np.testing.assert_allclose(values, losses["eager"], rtol=1e-5, err_msg=backend)


def test_history_has_one_column_per_layer_and_expert(corpus):
    history = Trainer(tiny_model(capacity_factor=1.0), corpus, tiny_config(steps=2, grad_accum=2)).train()
    per_layer = [f"{metric}/{l}" for l in range(2) for metric in ("max_mean_load", "drop_rate", "router_entropy")]
    loads = [f"load/{l}/{e}" for l in range(2) for e in range(4)]
    assert set(history.columns) == set(BASE_COLUMNS) | set(per_layer) | set(loads)  # no bias/ without the bias
    # the kept pairs of both micro-batches: 2 * B * S tokens, k = 2 pairs each, less the dropped ones
    kept = history[[f"load/0/{e}" for e in range(4)]].sum(axis=1)
    np.testing.assert_allclose(kept, 2 * 4 * 16 * 2 * (1 - history["drop_rate/0"]))
    assert (history["drop_rate/0"] > 0).any()  # capacity 1.0 on an untrained router drops some
    np.testing.assert_array_equal(moelab.training.load_array(history)[:, 0], history[loads[:4]].to_numpy())


def test_expert_bias_moves_by_rate_times_sign_of_mean_minus_load(corpus):
    rate = 1e-2
    trainer = Trainer(tiny_model(expert_bias=True, expert_bias_update_rate=rate), corpus, tiny_config(steps=2))
    router = next(iter(trainer.model.moe_layers().values())).router
    expected = torch.zeros(4)
    for _ in range(2):
        row = trainer.train_step()
        load = torch.tensor([row[f"load/0/{e}"] for e in range(4)], dtype=torch.float32)  # [E]
        expected = expected + rate * torch.sign(load.mean() - load)
        assert torch.equal(router.expert_bias, expected)
        assert [row[f"bias/0/{e}"] for e in range(4)] == expected.tolist()
    assert router.expert_bias.abs().sum() > 0


def test_callback_sees_each_row_and_can_stop_the_run(corpus):
    seen = []
    trainer = Trainer(tiny_model(), corpus, tiny_config(steps=4),
                      callback=lambda trainer, row: seen.append(row["step"]) or row["step"] == 2)
    assert len(trainer.train()) == 2 and seen == [1, 2] and trainer.step == 2
    with pytest.raises(ValueError, match="steps"):
        trainer.train(3)  # 2 steps are left


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("field, value", [
    ("steps", 0), ("steps", True), ("batch_size", 0), ("seq_len", 1), ("grad_accum", 0), ("lr", 0.0),
    ("lr", math.nan), ("weight_decay", -0.1), ("betas", (0.9,)), ("betas", (0.9, 1.0)), ("warmup_steps", 21),
    ("min_lr_ratio", 1.5), ("grad_clip", 0.0), ("seed", -1), ("eval_every", -1), ("eval_batches", 0),
    ("checkpoint_every", -1), ("progress", "yes"), ("max_tokens", 0), ("max_batch_tokens", 1.5),
])
def test_a_bad_field_is_named(field, value):
    with pytest.raises(ValueError, match=field):
        TrainingConfig(**{"steps": 20, field: value})


def test_checkpoint_every_needs_a_folder_and_the_trainer_checks_the_model():
    with pytest.raises(ValueError, match="checkpoint_dir"):
        TrainingConfig(checkpoint_every=5)
    with pytest.raises(ValueError, match="seq_len"):
        Trainer(tiny_model(), text_corpus(), tiny_config(seq_len=128))  # max_position_embeddings = 64


def test_the_guard_refuses_long_runs_and_big_micro_batches():
    with pytest.raises(ValueError, match="max_tokens"):
        TrainingConfig(steps=10_000, batch_size=16, seq_len=64)  # 10M tokens
    with pytest.raises(ValueError, match="max_batch_tokens"):
        TrainingConfig(batch_size=128, seq_len=64)  # 8192 tokens in one micro-batch
    steps = (MAX_TOKENS - 4 * MAX_BATCH_TOKENS) // MAX_BATCH_TOKENS  # training + 4 validation batches = the cap
    assert TrainingConfig(steps=steps, batch_size=64, seq_len=64, eval_batches=4).total_tokens == MAX_TOKENS
    with pytest.raises(ValueError, match="max_tokens"):
        TrainingConfig(steps=steps + 1, batch_size=64, seq_len=64, eval_batches=4)
    assert TrainingConfig(steps=10_000, batch_size=16, seq_len=64, max_tokens=2 ** 24).steps == 10_000


def test_merged_router_outputs_count_a_hand_built_output_as_all_kept():
    from moelab.layer.router import RouterOutput
    from moelab.training.analysis import routing_stats
    from moelab.training.history import merge_router_outputs

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 4, generator=generator)  # [T, E]
    index = logits.topk(2, dim=-1).indices  # [T, k]
    probs = logits.softmax(-1)
    weights = probs.gather(-1, index)
    dropped = torch.tensor([[False, True]] * 3 + [[False, False]] * 3)
    hand_built = RouterOutput(logits[:3], probs[:3], index[:3], weights[:3])  # four fields: dropped is None
    full = RouterOutput(logits[3:], probs[3:], index[3:], weights[3:], dropped[3:])
    merged = merge_router_outputs([hand_built, full])
    assert torch.equal(merged.top_k_index, index) and not merged.dropped.any()
    assert routing_stats(merged)["drop_rate"] == 0.0
    capped = merge_router_outputs([RouterOutput(logits[:3], probs[:3], index[:3], weights[:3], dropped[:3]), full])
    assert torch.equal(capped.dropped, dropped)
    assert routing_stats(capped)["tokens_per_expert"].sum() == 12 - 3  # kept pairs: T * k minus the drops
    assert merge_router_outputs([hand_built]).dropped is None
    with pytest.raises(ValueError, match="at least one RouterOutput"):
        merge_router_outputs([])
