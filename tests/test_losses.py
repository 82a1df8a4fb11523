"""Tests for the top-k KL and combined distillation losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgelm.train.losses import IGNORE_INDEX, distillation_loss, masked_cross_entropy, topk_kl_loss

B, T, V = 2, 5, 40


def make_teacher_targets(teacher_logits: torch.Tensor, k: int):
    """Return (ids, values, logsumexp) as a logit store would give them."""
    values, ids = teacher_logits.topk(k, dim=-1)
    return ids, values, torch.logsumexp(teacher_logits, dim=-1)


def reference_full_kl(student_logits, teacher_logits, mask, temperature=1.0):
    """KL(p || q) over the full vocabulary, written independently with F.kl_div."""
    log_q = F.log_softmax(student_logits[mask].double() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits[mask].double() / temperature, dim=-1)
    per_position = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    return per_position.mean() * temperature**2


@pytest.fixture
def logits():
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(B, T, V, generator=generator) * 3
    teacher = torch.randn(B, T, V, generator=generator) * 3
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, :2] = False
    mask[1, 4] = False
    return student, teacher, mask


def test_kl_zero_when_student_equals_teacher(logits):
    _, teacher, mask = logits
    loss = topk_kl_loss(teacher, *make_teacher_targets(teacher, V), mask)
    assert abs(loss.item()) < 1e-6


def test_kl_full_vocab_matches_reference(logits):
    student, teacher, mask = logits
    loss = topk_kl_loss(student, *make_teacher_targets(teacher, V), mask)
    expected = reference_full_kl(student, teacher, mask)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


def test_kl_full_vocab_matches_reference_at_temperature(logits):
    student, teacher, mask = logits
    for temperature in (0.5, 2.0):
        loss = topk_kl_loss(student, *make_teacher_targets(teacher, V), mask, temperature=temperature)
        expected = reference_full_kl(student, teacher, mask, temperature)
        assert loss.item() == pytest.approx(expected.item(), abs=1e-5), temperature


def test_kl_topk_with_tail_class(logits):
    """With k < V the loss equals KL over the k teacher ids plus one merged tail class."""
    student, teacher, mask = logits
    k = 8
    ids, values, lse = make_teacher_targets(teacher, k)
    loss = topk_kl_loss(student, ids, values, lse, mask)

    p = F.softmax(teacher.double(), -1)
    q = F.softmax(student.double(), -1)
    p_k, q_k = p.gather(-1, ids), q.gather(-1, ids)
    p_coarse = torch.cat([p_k, 1 - p_k.sum(-1, keepdim=True)], -1)
    q_coarse = torch.cat([q_k, 1 - q_k.sum(-1, keepdim=True)], -1)
    expected = (p_coarse * (p_coarse / q_coarse).log()).sum(-1)[mask].mean()
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    # Merging classes never increases KL (data processing inequality).
    assert loss.item() <= reference_full_kl(student, teacher, mask).item() + 1e-6


def test_kl_ignores_masked_positions(logits):
    student, teacher, mask = logits
    targets = make_teacher_targets(teacher, 8)
    before = topk_kl_loss(student, *targets, mask)
    changed = student.clone()
    changed[~mask] = torch.randn_like(changed[~mask]) * 10
    after = topk_kl_loss(changed, *targets, mask)
    assert after.item() == pytest.approx(before.item(), abs=1e-7)


def test_kl_gradient_zero_on_masked_positions(logits):
    student, teacher, mask = logits
    student = student.clone().requires_grad_(True)
    topk_kl_loss(student, *make_teacher_targets(teacher, 8), mask).backward()
    assert torch.all(student.grad[~mask] == 0)
    assert torch.all(torch.isfinite(student.grad))


def test_kl_empty_mask_is_zero(logits):
    student, teacher, _ = logits
    student = student.clone().requires_grad_(True)
    mask = torch.zeros(B, T, dtype=torch.bool)
    loss = topk_kl_loss(student, *make_teacher_targets(teacher, 8), mask)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.all(student.grad == 0)


def test_kl_temperature_softens_distributions(logits):
    """Unscaled KL between softened distributions shrinks as the temperature grows."""
    student, teacher, mask = logits
    targets = make_teacher_targets(teacher, V)
    unscaled = [
        topk_kl_loss(student, *targets, mask, temperature=t).item() / t**2 for t in (1.0, 2.0, 4.0, 8.0)
    ]
    assert unscaled == sorted(unscaled, reverse=True)
    assert unscaled[-1] < unscaled[0] / 10


def test_kl_temperature_scaled_by_t_squared(logits):
    student, teacher, mask = logits
    targets = make_teacher_targets(teacher, V)
    scaled = topk_kl_loss(student, *targets, mask, temperature=3.0)
    expected = reference_full_kl(student, teacher, mask, temperature=3.0)
    assert scaled.item() == pytest.approx(expected.item(), rel=1e-5)


def test_kl_never_negative():
    generator = torch.Generator().manual_seed(1)
    mask = torch.ones(4, 6, dtype=torch.bool)
    for scale in (0.0, 1e-4, 1.0, 30.0):
        for k in (1, 5, V):
            for temperature in (0.5, 1.0, 4.0):
                teacher = torch.randn(4, 6, V, generator=generator) * scale
                student = teacher + torch.randn(4, 6, V, generator=generator) * 1e-3
                # fp16 storage of the teacher values, as in the logit store.
                ids, values, lse = make_teacher_targets(teacher, k)
                loss = topk_kl_loss(student, ids, values.half(), lse, mask, temperature)
                assert torch.isfinite(loss), (scale, k, temperature)
                assert loss.item() >= 0.0, (scale, k, temperature)


def test_kl_handles_zero_teacher_probabilities():
    """A teacher that puts all its mass on one token (p = 0 elsewhere) gives no NaN."""
    teacher = torch.full((1, 2, V), -1e4)
    teacher[..., 3] = 0.0
    student = torch.randn(1, 2, V, requires_grad=True)
    mask = torch.ones(1, 2, dtype=torch.bool)
    for k in (1, 4, V):
        loss = topk_kl_loss(student, *make_teacher_targets(teacher, k), mask)
        loss.backward()
        expected = -F.log_softmax(student.detach(), -1)[..., 3].mean()
        assert loss.item() == pytest.approx(expected.item(), rel=1e-5), k
        assert torch.all(torch.isfinite(student.grad)), k
        student.grad = None


def test_kl_handles_minus_inf_teacher_logits():
    """Teacher logits of -inf (tokens a model masks out) inside the top-k give no NaN."""
    teacher = torch.full((1, 2, V), float("-inf"))
    teacher[..., :3] = torch.tensor([1.0, 0.5, -2.0])
    student = torch.randn(1, 2, V, requires_grad=True)
    mask = torch.ones(1, 2, dtype=torch.bool)
    for k in (5, V):
        for temperature in (1.0, 2.0):
            loss = topk_kl_loss(student, *make_teacher_targets(teacher, k), mask, temperature)
            loss.backward()
            assert torch.isfinite(loss), (k, temperature)
            assert torch.all(torch.isfinite(student.grad)), (k, temperature)
            student.grad = None


def test_kl_student_puts_no_mass_in_tail():
    """A student with no mass outside the teacher's top-k gives a finite loss and gradient."""
    teacher = torch.randn(1, 3, V)
    ids, values, lse = make_teacher_targets(teacher, 4)
    student = torch.full((1, 3, V), -1e4).scatter(-1, ids, 0.0).requires_grad_(True)
    loss = topk_kl_loss(student, ids, values, lse, torch.ones(1, 3, dtype=torch.bool))
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.all(torch.isfinite(student.grad))


def test_kl_bf16_inputs_computed_in_fp32(logits):
    student, teacher, mask = logits
    ids, values, lse = make_teacher_targets(teacher, 8)
    loss_bf16 = topk_kl_loss(student.bfloat16(), ids, values.bfloat16(), lse.bfloat16(), mask)
    loss_fp32 = topk_kl_loss(student.bfloat16().float(), ids, values.bfloat16().float(), lse.bfloat16().float(), mask)
    assert loss_bf16.dtype == torch.float32
    assert loss_bf16.item() == pytest.approx(loss_fp32.item(), rel=1e-6)


def test_kl_rejects_mismatched_shapes(logits):
    student, teacher, mask = logits
    ids, values, lse = make_teacher_targets(teacher, 8)
    with pytest.raises(ValueError, match="teacher_logsumexp"):
        topk_kl_loss(student, ids, values, lse[:, :3], mask)
    with pytest.raises(ValueError, match="temperature"):
        topk_kl_loss(student, ids, values, lse, mask, temperature=0.0)


def test_distillation_alpha_one_is_cross_entropy(logits):
    student, teacher, mask = logits
    labels = torch.randint(0, V, (B, T))
    labels[~mask] = IGNORE_INDEX
    parts = distillation_loss(student, labels, *make_teacher_targets(teacher, 8), mask, alpha=1.0)
    expected = F.cross_entropy(student[mask], labels[mask])
    assert parts.loss.item() == pytest.approx(expected.item(), abs=1e-6)
    assert parts.ce.item() == pytest.approx(expected.item(), abs=1e-6)
    assert parts.kl.item() > 0


def test_distillation_alpha_zero_is_kl(logits):
    student, teacher, mask = logits
    labels = torch.randint(0, V, (B, T))
    targets = make_teacher_targets(teacher, 8)
    parts = distillation_loss(student, labels, *targets, mask, alpha=0.0)
    assert parts.loss.item() == pytest.approx(topk_kl_loss(student, *targets, mask).item(), abs=1e-6)


def test_distillation_mixes_parts(logits):
    student, teacher, mask = logits
    labels = torch.randint(0, V, (B, T))
    labels[~mask] = IGNORE_INDEX
    parts = distillation_loss(student, labels, *make_teacher_targets(teacher, 8), mask, alpha=0.3)
    assert parts.loss.item() == pytest.approx(0.3 * parts.ce.item() + 0.7 * parts.kl.item(), rel=1e-6)
    with pytest.raises(ValueError, match="alpha"):
        distillation_loss(student, labels, *make_teacher_targets(teacher, 8), mask, alpha=1.5)


def test_cross_entropy_all_ignored_is_zero(logits):
    student, _, _ = logits
    labels = torch.full((B, T), IGNORE_INDEX)
    assert masked_cross_entropy(student, labels).item() == 0.0
