"""Knowledge-distillation losses against a teacher's stored top-k logits.

Shapes use B = batch, T = sequence positions, V = vocabulary size, k = stored top-k.
All positional tensors are aligned with the student's logits: position t contains the target
for the token at t + 1 (the usual causal-LM shift is already applied by the caller).
Every loss is computed in fp32, whatever the input dtype (bf16 and fp16 logits are upcast).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

# Floor for the student's tail probability, so log(q_tail) stays finite when the student
# puts (numerically) all of its mass on the teacher's top-k ids.
_MIN_TAIL_PROB = 1e-12


@dataclass
class DistillationLoss:
    """Combined loss and its parts. `ce` and `kl` are detached, for logging."""

    loss: torch.Tensor
    ce: torch.Tensor
    kl: torch.Tensor


def topk_kl_loss(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_logsumexp: torch.Tensor,
    mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Compute forward KL(teacher || student), averaged over the positions where `mask` is True.

    Args:
        student_logits: [B, T, V] float, any dtype.
        teacher_ids: [B, T, k] int64, the teacher's top-k token ids at each position.
        teacher_logits: [B, T, k] float, the teacher's logits for those ids.
        teacher_logsumexp: [B, T] float, log-sum-exp of the teacher's logits over the full vocabulary.
        mask: [B, T] bool, True where the position has a teacher target.
        temperature: softmax temperature for both models.

    At temperature 1 the teacher's probabilities are exact, p_i = exp(v_i - logsumexp). The
    mass outside the top-k forms one tail class, p_tail = 1 - sum(p_i), compared with the
    student's mass outside the same ids, q_tail. With k == V there is no tail and the result is
    the full-vocabulary KL.

    At any other temperature the teacher's full log-sum-exp at that temperature is unknown, so
    the teacher's top-k logits are renormalised among themselves at the temperature (the tail
    is dropped, as if it had probability 0). They are compared with the student's full-vocabulary
    log-softmax at the temperature, gathered at the same ids, and the result is multiplied by
    temperature**2 to keep gradient sizes comparable across temperatures. Because the student's
    mass outside the top-k counts as error there, a high temperature with k much smaller than V
    raises the loss rather than lowering it.

    Returns a scalar tensor, 0 (with a gradient path) when no position is masked in.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive")
    _check_target_shapes(student_logits, teacher_ids, teacher_logits, teacher_logsumexp, mask)
    mask = mask.bool()
    if not mask.any():
        return student_logits.float().sum() * 0.0

    # Select the masked positions first, so the [N, V] fp32 work skips prompt and padding.
    student = student_logits[mask].float()  # [N, V]
    ids = teacher_ids[mask].long()  # [N, k]
    teacher = teacher_logits[mask].float()  # [N, k]
    vocab_size = student.shape[-1]
    top_k = ids.shape[-1]

    if temperature == 1.0:
        per_position = _kl_with_tail(student, ids, teacher, teacher_logsumexp[mask].float(), top_k < vocab_size)
    else:
        log_p = torch.log_softmax(teacher / temperature, dim=-1)
        log_q = torch.log_softmax(student / temperature, dim=-1).gather(-1, ids)
        per_position = _cross_term(log_p, log_q).sum(-1) * temperature**2

    # KL is non-negative, but rounding in fp16-stored teacher values can push it slightly below 0.
    return per_position.clamp_min(0.0).mean()


def _kl_with_tail(
    student: torch.Tensor, ids: torch.Tensor, teacher: torch.Tensor, teacher_lse: torch.Tensor, has_tail: bool
) -> torch.Tensor:
    """Return KL(p || q) per position over the top-k ids plus one tail class; inputs are [N, ...] fp32."""
    student_lse = torch.logsumexp(student, dim=-1, keepdim=True)
    log_q = student.gather(-1, ids) - student_lse
    log_p = teacher - teacher_lse.unsqueeze(-1)
    p = log_p.exp()
    per_position = _cross_term(log_p, log_q).sum(-1)
    if not has_tail:
        return per_position

    p_tail = (1.0 - p.sum(-1)).clamp_min(0.0)
    # The student's tail is the log-sum-exp over the ids not in the top-k. Computing it this way
    # avoids the cancellation in 1 - sum(q_i) when the top-k contains almost all of the mass.
    outside = student.scatter(-1, ids, float("-inf"))
    log_q_tail = (torch.logsumexp(outside, dim=-1) - student_lse.squeeze(-1)).clamp_min(math.log(_MIN_TAIL_PROB))
    # xlogy gives 0 * log(0) = 0 for a teacher with no tail mass.
    tail = torch.xlogy(p_tail, p_tail) - p_tail * log_q_tail
    return per_position + tail


def _cross_term(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Return p * (log p - log q) elementwise, with 0 where p == 0 (a teacher logit of -inf)."""
    term = log_p.exp() * (log_p - log_q)
    return torch.where(log_p == float("-inf"), torch.zeros_like(term), term)


def _check_target_shapes(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_logsumexp: torch.Tensor,
    mask: torch.Tensor,
) -> None:
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be [B, T, V]; got shape {tuple(student_logits.shape)}")
    batch_positions = tuple(student_logits.shape[:2])
    if teacher_ids.shape != teacher_logits.shape or teacher_ids.dim() != 3:
        raise ValueError(
            f"teacher_ids {tuple(teacher_ids.shape)} and teacher_logits {tuple(teacher_logits.shape)} "
            f"must both be [B, T, k]"
        )
    for name, tensor in (("teacher_ids", teacher_ids), ("teacher_logsumexp", teacher_logsumexp), ("mask", mask)):
        if tuple(tensor.shape[:2]) != batch_positions:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, but student_logits is {tuple(student_logits.shape)}; "
                f"the first two dimensions [B, T] must match"
            )
    if teacher_ids.shape[-1] > student_logits.shape[-1]:
        raise ValueError(
            f"top-k={teacher_ids.shape[-1]} is larger than the student's vocabulary {student_logits.shape[-1]}"
        )


def masked_cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Return the mean cross-entropy over positions whose label is not -100 (0 when there are none).

    Args:
        student_logits: [B, T, V] float; position t predicts labels[:, t].
        labels: [B, T] int64 token ids, already shifted to align with the logits.
    """
    selected = labels != IGNORE_INDEX
    if not selected.any():
        return student_logits.float().sum() * 0.0
    # Select first, so the fp32 log-softmax runs only on the labelled positions.
    return F.cross_entropy(student_logits[selected].float(), labels[selected].long())


def distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logits: torch.Tensor,
    teacher_logsumexp: torch.Tensor,
    mask: torch.Tensor,
    alpha: float = 0.5,
    temperature: float = 1.0,
) -> DistillationLoss:
    """Combine alpha * cross-entropy on `labels` with (1 - alpha) * topk_kl_loss.

    `labels` is [B, T], aligned with the logits like the teacher tensors (position t contains the
    token at t + 1), with -100 where no cross-entropy applies. See topk_kl_loss for the other
    arguments. Both parts are always computed so they can be logged, even at alpha 0 or 1.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be between 0 and 1 (the weight of the cross-entropy term)")
    ce = masked_cross_entropy(student_logits, labels)
    kl = topk_kl_loss(student_logits, teacher_ids, teacher_logits, teacher_logsumexp, mask, temperature)
    loss = alpha * ce + (1.0 - alpha) * kl
    return DistillationLoss(loss=loss, ce=ce.detach(), kl=kl.detach())
