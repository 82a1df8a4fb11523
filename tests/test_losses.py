"""Tests for the top-k distillation divergences and the combined loss."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from edgelm.train.losses import IGNORE_INDEX, LOSS_NAMES, distillation_loss, topk_divergence

B, T, V = 2, 5, 40


def make_targets(teacher_logits: torch.Tensor, k: int):
    """Return (ids, logprobs) as a logit store gives them."""
    logprobs = torch.log_softmax(teacher_logits.float(), dim=-1)
    values, ids = logprobs.topk(k, dim=-1)
    return ids, values


def mean_divergence(student, teacher_logits, mask, k=V, **kwargs):
    return topk_divergence(student, *make_targets(teacher_logits, k), mask, **kwargs).mean()


def reference(student_logits, teacher_logits, mask, loss, beta=0.5, temperature=1.0):
    """Full-vocabulary divergence in float64, written independently of edgelm.train.losses."""
    log_q = F.log_softmax(student_logits[mask].double() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits[mask].double() / temperature, dim=-1)
    return reference_divergence(log_p, log_q, loss, beta).mean() * temperature**2


def reference_divergence(log_p, log_q, loss, beta):
    """Per-row divergence `loss` between distributions given as log-probabilities."""
    p, q = log_p.exp(), log_q.exp()
    if loss == "forward_kl":
        return (p * (log_p - log_q)).sum(-1)
    if loss == "reverse_kl":
        return (q * (log_q - log_p)).sum(-1)
    if loss == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    m = beta * p + (1 - beta) * q
    return beta * (p * (p / m).log()).sum(-1) + (1 - beta) * (q * (q / m).log()).sum(-1)


@pytest.fixture
def logits():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(B, T, V, generator=generator) * 3
    teacher = torch.randn(B, T, V, generator=generator) * 3
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :2] = False
    mask[1, 4] = False
    return student, teacher, mask


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_divergence_zero_when_student_equals_teacher(logits, loss):
    _, teacher, mask = logits
    for k in (5, V):
        value = mean_divergence(teacher, teacher, mask, k=k, loss=loss)
        assert abs(value.item()) < 1e-6, k


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_divergence_full_vocab_matches_reference(logits, loss):
    student, teacher, mask = logits
    for beta in (0.25, 0.5, 0.75):
        value = mean_divergence(student, teacher, mask, loss=loss, beta=beta)
        expected = reference(student, teacher, mask, loss, beta)
        assert value.item() == pytest.approx(expected.item(), abs=1e-5), beta


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_divergence_full_vocab_at_temperature(logits, loss):
    student, teacher, mask = logits
    for temperature in (0.5, 2.0):
        value = mean_divergence(student, teacher, mask, loss=loss, temperature=temperature)
        expected = reference(student, teacher, mask, loss, temperature=temperature)
        assert value.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6), temperature


def test_jsd_beta_limits_are_kl(logits):
    student, teacher, mask = logits
    forward = mean_divergence(student, teacher, mask, k=8, loss="forward_kl")
    reverse = mean_divergence(student, teacher, mask, k=8, loss="reverse_kl")
    assert mean_divergence(student, teacher, mask, k=8, loss="jsd", beta=0.0).item() == forward.item()
    assert mean_divergence(student, teacher, mask, k=8, loss="jsd", beta=1.0).item() == reverse.item()
    # Close to the limits the mixture divergence is small, as in trl's definition.
    assert mean_divergence(student, teacher, mask, k=8, loss="jsd", beta=1e-4).item() < 1e-2


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_topk_tail_class_matches_coarse_reference(logits, loss):
    """With k < V the divergence is that of both distributions merged to k ids plus one tail class."""
    student, teacher, mask = logits
    k = 8
    ids, logprobs = make_targets(teacher, k)
    value = topk_divergence(student, ids, logprobs, mask, loss=loss).mean()

    p = F.softmax(teacher.double(), -1).gather(-1, ids)
    q = F.softmax(student.double(), -1).gather(-1, ids)
    p = torch.cat([p, 1 - p.sum(-1, keepdim=True)], -1)[mask]
    q = torch.cat([q, 1 - q.sum(-1, keepdim=True)], -1)[mask]
    coarse = reference(q.log().unsqueeze(0), p.log().unsqueeze(0), torch.ones(1, len(p), dtype=torch.bool), loss)
    assert value.item() == pytest.approx(coarse.item(), rel=1e-5, abs=1e-5)
    # Merging classes never increases an f-divergence (data processing inequality).
    assert value.item() <= reference(student, teacher, mask, loss).item() + 1e-6


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_divergence_ignores_masked_positions(logits, loss):
    student, teacher, mask = logits
    targets = make_targets(teacher, 8)
    before = topk_divergence(student, *targets, mask, loss=loss)
    changed = student.clone()
    changed[~mask] = torch.randn_like(changed[~mask]) * 10
    after = topk_divergence(changed, *targets, mask, loss=loss)
    assert before.shape == (int(mask.sum()),)
    assert torch.equal(after, before)


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_gradient_zero_on_masked_positions(logits, loss):
    student, teacher, mask = logits
    student = student.clone().requires_grad_(True)
    topk_divergence(student, *make_targets(teacher, 8), mask, loss=loss).sum().backward()
    assert torch.all(student.grad[~mask] == 0)
    assert torch.all(torch.isfinite(student.grad))


def test_empty_mask_gives_zero_loss(logits):
    student, teacher, _ = logits
    student = student.clone().requires_grad_(True)
    mask = torch.zeros(B, T, dtype=torch.bool)
    labels = torch.full((B, T), IGNORE_INDEX)
    parts = distillation_loss(student, labels, *make_targets(teacher, 8), mask)
    parts.loss.backward()
    assert parts.loss.item() == 0.0
    assert parts.tokens == 0
    assert torch.all(student.grad == 0)


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_temperature_limits(logits, loss):
    """Very high temperatures flatten both models; very low ones agree when the argmax does."""
    student, teacher, mask = logits
    unscaled = [
        mean_divergence(student, teacher, mask, loss=loss, temperature=t).item() / t**2 for t in (1.0, 10.0, 1000.0)
    ]
    assert unscaled[1] < unscaled[0]
    # KL-type divergences shrink as 1 / T**2 and total variation as 1 / T.
    assert unscaled[2] < unscaled[0] * 1e-2

    same_argmax = teacher + 0.3 * torch.randn_like(teacher)
    same_argmax.scatter_(-1, teacher.argmax(-1, keepdim=True), teacher.max(-1, keepdim=True).values + 5.0)
    teacher_sharp = teacher.clone()
    teacher_sharp.scatter_(-1, teacher.argmax(-1, keepdim=True), teacher.max(-1, keepdim=True).values + 5.0)
    cold = mean_divergence(same_argmax, teacher_sharp, mask, loss=loss, temperature=0.01).item() / 0.01**2
    assert cold < 1e-6


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_divergence_never_negative_in_bf16(loss):
    generator = torch.Generator().manual_seed(1)
    mask = torch.ones(4, 6, dtype=torch.bool)
    for scale in (0.0, 1e-4, 1.0, 30.0):
        for k in (1, 5, V):
            for temperature in (0.5, 1.0, 4.0):
                teacher = torch.randn(4, 6, V, generator=generator) * scale
                student = (teacher + torch.randn(4, 6, V, generator=generator) * 1e-3).bfloat16()
                ids, logprobs = make_targets(teacher, k)
                # fp16 storage of the teacher values, as in the logit store, then bf16 training.
                values = topk_divergence(student, ids, logprobs.half().bfloat16(), mask, loss=loss, temperature=temperature)
                assert values.dtype == torch.float32
                assert torch.all(torch.isfinite(values)), (scale, k, temperature)
                assert torch.all(values >= 0.0), (scale, k, temperature)


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_teacher_with_zero_probabilities(loss):
    """A one-hot teacher and teacher logits of -inf give finite values and gradients."""
    one_hot = torch.full((1, 2, V), -1e4)
    one_hot[..., 3] = 0.0
    masked_out = torch.full((1, 2, V), float("-inf"))
    masked_out[..., :3] = torch.tensor([1.0, 0.5, -2.0])
    student = torch.randn(1, 2, V, requires_grad=True)
    mask = torch.ones(1, 2, dtype=torch.bool)
    for teacher in (one_hot, masked_out):
        for k in (1, 5, V):
            for temperature in (1.0, 2.0):
                values = topk_divergence(student, *make_targets(teacher, k), mask, loss=loss, temperature=temperature)
                values.sum().backward()
                assert torch.all(torch.isfinite(values)), (k, temperature)
                assert torch.all(torch.isfinite(student.grad)), (k, temperature)
                student.grad = None


def test_forward_kl_one_hot_teacher():
    teacher = torch.full((1, 2, V), -1e4)
    teacher[..., 3] = 0.0
    student = torch.randn(1, 2, V)
    mask = torch.ones(1, 2, dtype=torch.bool)
    expected = -F.log_softmax(student, -1)[..., 3].mean()
    for k in (1, 4, V):
        assert mean_divergence(student, teacher, mask, k=k).item() == pytest.approx(expected.item(), rel=1e-5), k


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_student_with_no_tail_mass(loss):
    teacher = torch.randn(1, 3, V)
    ids, logprobs = make_targets(teacher, 4)
    student = torch.full((1, 3, V), -1e4).scatter(-1, ids, 0.0).requires_grad_(True)
    values = topk_divergence(student, ids, logprobs, torch.ones(1, 3, dtype=torch.bool), loss=loss)
    values.sum().backward()
    assert torch.all(torch.isfinite(values))
    assert torch.all(torch.isfinite(student.grad))
    # The same through the combined loss, whose cross-entropy shares the student's pass.
    student.grad = None
    parts = distillation_loss(student, ids[..., 0], ids, logprobs, torch.ones(1, 3, dtype=torch.bool), loss=loss)
    parts.loss.backward()
    assert torch.isfinite(parts.loss)
    assert torch.all(torch.isfinite(student.grad))


def test_rejects_bad_settings(logits):
    student, teacher, mask = logits
    ids, logprobs = make_targets(teacher, 8)
    with pytest.raises(ValueError, match="mask"):
        topk_divergence(student, ids, logprobs, mask[:, :3])
    for temperature in (0.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            topk_divergence(student, ids, logprobs, mask, temperature=temperature)
    with pytest.raises(ValueError, match="beta"):
        topk_divergence(student, ids, logprobs, mask, loss="jsd", beta=1.5)
    with pytest.raises(ValueError, match="forward_kl"):
        topk_divergence(student, ids, logprobs, mask, loss="kl")


requires_trl = pytest.mark.skipif(
    importlib.util.find_spec("trl") is None, reason="trl is not installed (`pip install trl`, a test dependency)"
)


@requires_trl
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_matches_trl(logits, temperature):
    """With k = V the divergence equals trl's GKDTrainer.generalized_jsd_loss (times T squared)."""
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    student, teacher, mask = logits
    labels = torch.where(mask, torch.zeros(B, T, dtype=torch.long), IGNORE_INDEX)
    for beta in (0.0, 0.1, 0.5, 0.9, 1.0):
        trl_value = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=temperature)
        ours = mean_divergence(student, teacher, mask, loss="jsd", beta=beta, temperature=temperature)
        assert ours.item() == pytest.approx(trl_value.item() * temperature**2, abs=1e-5), beta


def test_alpha_one_is_cross_entropy(logits):
    student, teacher, mask = logits
    labels = torch.randint(0, V, (B, T))
    labels[~mask] = IGNORE_INDEX
    parts = distillation_loss(student, labels, *make_targets(teacher, 8), mask, alpha=1.0)
    expected = F.cross_entropy(student[mask], labels[mask])
    assert parts.loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert parts.ce.item() == pytest.approx(expected.item(), abs=1e-6)
    assert parts.divergence.item() > 0


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_alpha_zero_is_divergence(logits, loss):
    student, teacher, mask = logits
    labels = torch.randint(0, V, (B, T))
    targets = make_targets(teacher, 8)
    parts = distillation_loss(student, labels, *targets, mask, alpha=0.0, loss=loss)
    expected = topk_divergence(student, *targets, mask, loss=loss).mean()
    assert parts.loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_alpha_mixes_parts(logits):
    student, teacher, mask = logits
    labels = torch.randint(0, V, (B, T))
    labels[~mask] = IGNORE_INDEX
    parts = distillation_loss(student, labels, *make_targets(teacher, 8), mask, alpha=0.3)
    assert parts.loss.item() == pytest.approx(0.3 * parts.ce.item() + 0.7 * parts.divergence.item(), rel=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(student, labels, *make_targets(teacher, 8), mask, alpha=1.5)


def test_num_items_in_batch_sums_to_full_batch(logits):
    """Two halves normalised by the full batch's target count add up to the full batch's mean loss."""
    student, teacher, mask = logits
    labels = torch.randint(0, V, (B, T))
    labels[~mask] = IGNORE_INDEX
    ids, logprobs = make_targets(teacher, 8)
    full = distillation_loss(student, labels, ids, logprobs, mask, alpha=0.4, loss="jsd")
    total = int(mask.sum())
    halves = [
        distillation_loss(student[i : i + 1], labels[i : i + 1], ids[i : i + 1], logprobs[i : i + 1], mask[i : i + 1],
                          alpha=0.4, loss="jsd", num_items_in_batch=torch.tensor(total))
        for i in range(B)
    ]
    assert sum(half.loss.item() for half in halves) == pytest.approx(full.loss.item(), rel=1e-6)
    assert [half.tokens for half in halves] == [3, 4]


def test_student_log_probs_gradient_is_exact():
    """_StudentLogProbs' hand-written backward passes torch's numerical gradient check in float64."""
    from edgelm.train.losses import _StudentLogProbs

    generator = torch.Generator().manual_seed(1)
    logits = (torch.randn(4, V, generator=generator, dtype=torch.float64) * 3).requires_grad_(True)
    ids = torch.randn(4, V, generator=generator).topk(6, dim=-1).indices
    # Labels inside and outside the top-k.
    outside = next(j for j in range(V) if j not in ids[2].tolist())
    labels = torch.tensor([ids[0, 0].item(), ids[1, 5].item(), outside, ids[3, 2].item()])
    assert torch.autograd.gradcheck(lambda x: _StudentLogProbs.apply(x, ids, labels), (logits,))


def reference_loss(student, labels, ids, logprobs, tail, mask, loss, alpha, beta):
    """The combined loss from log_softmax, gather and logsumexp, as the shared pass replaces them."""
    selected = student[mask]
    log_q_all = F.log_softmax(selected, dim=-1)
    ce = -log_q_all.gather(-1, labels[mask].unsqueeze(-1)).squeeze(-1)
    log_q_tail = torch.logsumexp(log_q_all.scatter(-1, ids[mask], float("-inf")), dim=-1, keepdim=True)
    log_q = torch.cat([log_q_all.gather(-1, ids[mask]), log_q_tail], dim=-1)
    log_p = torch.cat([logprobs[mask], tail[mask].unsqueeze(-1)], dim=-1)
    divergence = reference_divergence(log_p, log_q, loss, beta)
    return (alpha * ce.sum() + (1 - alpha) * divergence.sum()) / int(mask.sum())


@pytest.mark.parametrize("loss", LOSS_NAMES)
def test_shared_student_pass_matches_separate_ops(logits, loss):
    """The loss with cross-entropy and divergence on the same positions has the value and gradient of the plain ops."""
    student, teacher, mask = logits
    ids, logprobs = make_targets(teacher, 8)
    tail = torch.log1p(-logprobs.exp().sum(-1).clamp_max(1 - 1e-6))
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(2))
    labels[0, 2] = ids[0, 2, 0]
    labels[~mask] = IGNORE_INDEX
    ours = student.clone().requires_grad_(True)
    parts = distillation_loss(ours, labels, ids, logprobs, mask, alpha=0.3, loss=loss, beta=0.4, teacher_tail_logprob=tail)
    parts.loss.backward()
    plain = student.clone().requires_grad_(True)
    expected = reference_loss(plain, labels, ids, logprobs, tail, mask, loss, alpha=0.3, beta=0.4)
    expected.backward()
    assert parts.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(ours.grad, plain.grad, rtol=1e-4, atol=1e-7)
    assert torch.all(ours.grad[~mask] == 0)


@pytest.mark.parametrize("gap", [25.0, 100.0, 110.0])
def test_confident_student_gradient_in_fp32(gap):
    """A student whose tail is below fp32's smallest probability keeps the float64 loss and gradient."""
    ids = torch.arange(3).view(1, 1, 3)
    logprobs = torch.tensor([0.6, 0.3, 0.09]).log().view(1, 1, 3)
    tail = torch.tensor([[math.log(0.01)]])
    mask = torch.ones(1, 1, dtype=torch.bool)
    labels = torch.zeros(1, 1, dtype=torch.long)
    logits = torch.zeros(1, 1, V)
    logits[0, 0, :3] = torch.tensor([gap, gap - 1, gap - 2])
    ours = logits.clone().requires_grad_(True)
    parts = distillation_loss(ours, labels, ids, logprobs, mask, teacher_tail_logprob=tail)
    parts.loss.backward()
    exact = logits.double().requires_grad_(True)
    expected = reference_loss(exact, labels, ids, logprobs.double(), tail.double(), mask, "forward_kl", 0.5, 0.5)
    expected.backward()
    assert parts.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(ours.grad, exact.grad.float(), rtol=1e-4, atol=1e-7)
