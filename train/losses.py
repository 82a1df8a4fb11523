"""Knowledge-distillation losses against a teacher's stored top-k log-probabilities.

Shapes use B = batch, T = sequence positions, V = vocabulary size, k = stored top-k.
All positional tensors are aligned with the student's logits: position t contains the target
for the token at t + 1 (the usual causal-LM shift is already applied by the caller).
Every loss is computed in fp32, whatever the input dtype (bf16 and fp16 logits are upcast).

Divergences between the teacher distribution p and the student distribution q:
    forward_kl  KL(p || q) = sum p (log p - log q)
    reverse_kl  KL(q || p) = sum q (log q - log p)
    jsd         beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q, for 0 < beta < 1;
                beta = 0 is forward_kl and beta = 1 is reverse_kl. This is the convention of
                trl.experimental.gkd.GKDTrainer.generalized_jsd_loss (trl 1.16).
    tv          total variation, (1/2) sum |p - q|
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
LOSS_NAMES = ("forward_kl", "reverse_kl", "jsd", "tv")

# Stand-in for a probability of 0 inside a logarithm, so log p and log q stay finite when a
# model gives a token a logit of -inf or the teacher's tail mass rounds to 0.
_MIN_PROB = 1e-12
_MIN_LOG_PROB = math.log(_MIN_PROB)


@dataclass
class DistillationLoss:
    """Combined loss and its parts. `ce` and `divergence` are detached means over the masked positions."""

    loss: torch.Tensor
    ce: torch.Tensor
    divergence: torch.Tensor
    tokens: int


@dataclass
class _Distributions:
    """Teacher and student over the same classes: [N, C] probabilities and their floored logs."""

    p: torch.Tensor
    log_p: torch.Tensor
    q: torch.Tensor
    log_q: torch.Tensor


class _StudentLogProbs(torch.autograd.Function):
    """Student log-probabilities at the teacher's top-k ids, the tail class and the labels, from [N, V] fp32 logits.

    Returns ([N, k], [N], [N]). The same values come from log_softmax, gather, scatter and
    logsumexp, but each of those builds an [N, V] tensor forward and another backward. For 384
    tokens of SmolLM2's vocabulary on 2 CPU cores those took 0.74 s, and this function 0.15 s.
    Here the backward pass writes one [N, V] gradient from these
    derivatives (q = softmax(x), S = top-k ids, x_out = x with -inf at S):
        d log q_i / d x_j    = [j = i] - q_j
        d log q_tail / d x_j = [j not in S] exp(x_out_j - logsumexp(x_out)) - q_j
    The tail is kept in log space, as logsumexp(x_out) - logsumexp(x), and its derivative uses
    exp(x_out - logsumexp(x_out)) rather than q_j / q_tail: for a confident student q_tail
    underflows in fp32 (log q_tail below about -87), where the ratio is still well defined.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor):
        outside = logits.scatter(-1, ids, float("-inf"))
        lse_outside = torch.logsumexp(outside, dim=-1, keepdim=True)
        topk = logits.gather(-1, ids)
        # The full log-sum-exp from its two parts, without another pass over the vocabulary.
        lse = torch.logaddexp(lse_outside, torch.logsumexp(topk, dim=-1, keepdim=True))
        log_q_label = logits.gather(-1, labels.unsqueeze(-1)) - lse
        ctx.save_for_backward(logits, outside, ids, labels, lse, lse_outside)
        return topk - lse, (lse_outside - lse).squeeze(-1), log_q_label.squeeze(-1)

    @staticmethod
    def backward(ctx, grad_topk: torch.Tensor, grad_tail: torch.Tensor, grad_label: torch.Tensor):
        logits, outside, ids, labels, lse, lse_outside = ctx.saved_tensors
        grad_tail, grad_label = grad_tail.unsqueeze(-1), grad_label.unsqueeze(-1)
        # A tail of 0 has log -inf, which the losses replace by a constant, so its gradient is 0.
        has_tail = torch.isfinite(lse_outside)
        grad_tail = torch.where(has_tail, grad_tail, torch.zeros_like(grad_tail))
        every = grad_topk.sum(-1, keepdim=True) + grad_tail + grad_label
        tail_share = (outside - torch.where(has_tail, lse_outside, lse)).exp_()
        grad = tail_share.mul_(grad_tail).sub_((logits - lse).exp_().mul_(every))
        grad.scatter_add_(-1, ids, grad_topk)
        grad.scatter_add_(-1, labels.unsqueeze(-1), grad_label)
        return grad, None, None


def _topk_distributions(
    student: torch.Tensor, ids: torch.Tensor, teacher_logprobs: torch.Tensor, temperature: float,
    teacher_tail_logprob: torch.Tensor | None, student_log_probs: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> _Distributions:
    """Build both distributions over the teacher's k ids, plus one tail class when k < V.

    At temperature 1 the teacher's top-k probabilities are exact and the mass outside them is
    the tail class, compared with the student's mass outside the same ids. The teacher's tail
    is `teacher_tail_logprob` when given, else 1 - sum p_i (which cancels badly for small tails).
    At any other temperature the teacher's tail at that temperature is unknown, so both models
    are restricted to the k ids and renormalised there. With k = V both cases are exact.
    `student_log_probs`, the student's (log q at ids, log q of the tail) when the caller has
    them already, is used at temperature 1 with a tail.
    """
    vocab_size = student.shape[-1]
    has_tail = ids.shape[-1] < vocab_size
    if temperature != 1.0 or not has_tail:
        log_p = torch.log_softmax(teacher_logprobs / temperature, dim=-1)
        if has_tail:
            log_q = torch.log_softmax(student.gather(-1, ids) / temperature, dim=-1)
        else:
            log_q = torch.log_softmax(student / temperature, dim=-1).gather(-1, ids)
        return _Distributions(log_p.exp(), _finite_log(log_p), log_q.exp(), _finite_log(log_q))

    if student_log_probs is None:
        # No labels here, so the first top-k id stands in for them and that output is dropped.
        log_q_topk, log_q_tail, _ = _StudentLogProbs.apply(student, ids, ids[:, 0])
    else:
        log_q_topk, log_q_tail = student_log_probs
    log_q = torch.cat([log_q_topk, log_q_tail.unsqueeze(-1)], dim=-1)

    p_topk = teacher_logprobs.exp()
    if teacher_tail_logprob is not None:
        log_p_tail = teacher_tail_logprob.unsqueeze(-1)
        p_tail = log_p_tail.exp()
    else:
        # fp16 rounding of stored values can push sum(p_i) slightly above 1.
        p_tail = (1.0 - p_topk.sum(-1, keepdim=True)).clamp_min(0.0)
        log_p_tail = p_tail.clamp_min(_MIN_PROB).log()
    p = torch.cat([p_topk, p_tail], dim=-1)
    log_p = torch.cat([teacher_logprobs, log_p_tail], dim=-1)
    return _Distributions(p, _finite_log(log_p), log_q.exp(), _finite_log(log_q))


def _finite_log(log_prob: torch.Tensor) -> torch.Tensor:
    """Replace log(0) = -inf (a logit of -inf) by log(_MIN_PROB); keep every finite value exact."""
    return torch.where(torch.isneginf(log_prob), torch.full_like(log_prob, _MIN_LOG_PROB), log_prob)


def _kl(a: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Return KL(a || b) per row; a class with a = 0 contributes 0 (0 log 0 = 0)."""
    term = a * (log_a - log_b)
    return torch.where(a > 0, term, torch.zeros_like(term)).sum(-1)


def _divergence(dist: _Distributions, loss: str, beta: float) -> torch.Tensor:
    """Return the per-row divergence `loss` between teacher p and student q."""
    if loss == "forward_kl" or (loss == "jsd" and beta == 0.0):
        return _kl(dist.p, dist.log_p, dist.log_q)
    if loss == "reverse_kl" or (loss == "jsd" and beta == 1.0):
        return _kl(dist.q, dist.log_q, dist.log_p)
    if loss == "jsd":
        log_m = torch.logaddexp(dist.log_p + math.log(beta), dist.log_q + math.log1p(-beta))
        return beta * _kl(dist.p, dist.log_p, log_m) + (1.0 - beta) * _kl(dist.q, dist.log_q, log_m)
    if loss == "tv":
        return 0.5 * (dist.p - dist.q).abs().sum(-1)
    raise ValueError(f"loss={loss!r} is not one of {LOSS_NAMES}")


def check_loss_settings(loss: str, beta: float, temperature: float) -> None:
    """Raise ValueError naming the bad value unless loss, beta and temperature are valid."""
    if loss not in LOSS_NAMES:
        raise ValueError(f"loss={loss!r} is not one of {LOSS_NAMES}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta={beta} must be between 0 (forward KL) and 1 (reverse KL)")
    if not 0 < temperature < math.inf:
        raise ValueError(f"temperature={temperature} must be a positive finite number")


def topk_divergence(
    student_logits: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    loss: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    teacher_tail_logprob: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return the divergence `loss` at each masked-in position, as a 1-D fp32 tensor [N].

    Args:
        student_logits: [B, T, V] float, any dtype.
        teacher_ids: [B, T, k] int64, the teacher's top-k token ids at each position.
        teacher_logprobs: [B, T, k] float, the teacher's log-probabilities for those ids,
            normalised over the full vocabulary (logit - logsumexp).
        mask: [B, T] bool, True where the position has a teacher target.
        loss: one of LOSS_NAMES (see the module docstring).
        beta: the generalized JSD's mixture weight of the teacher; used only by "jsd".
        temperature: softmax temperature for both models. The result is multiplied by
            temperature**2, the usual factor that keeps gradient sizes comparable across
            temperatures (trl's generalized_jsd_loss does not apply it).
        teacher_tail_logprob: [B, T] float, log of the teacher's mass outside its top-k, as
            the logit store keeps it. None derives it from teacher_logprobs.

    Values are clamped at 0 per position, because fp16 rounding of the stored teacher values
    can make a divergence slightly negative.
    """
    check_loss_settings(loss, beta, temperature)
    _check_target_shapes(student_logits, teacher_ids, teacher_logprobs, mask)
    mask = mask.bool()
    # Select the masked positions first, so the [N, V] fp32 work skips prompt and padding.
    student = _select(student_logits, mask).float()
    return _selected_divergence(student, teacher_ids, teacher_logprobs, mask, teacher_tail_logprob, loss, beta, temperature)


def _selected_divergence(
    student: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor,
    teacher_tail_logprob: torch.Tensor | None, loss: str, beta: float, temperature: float,
    student_log_probs: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Return topk_divergence of the student's selected [N, V] fp32 logits against the `mask` positions of the teacher tensors."""
    ids = teacher_ids[mask].long()
    teacher = teacher_logprobs[mask].float()
    tail = teacher_tail_logprob[mask].float() if teacher_tail_logprob is not None else None
    if student.shape[0] == 0:
        return student.sum(-1)
    dist = _topk_distributions(student, ids, teacher, temperature, tail, student_log_probs)
    return _divergence(dist, loss, beta).clamp_min(0.0) * temperature**2


def _check_target_shapes(
    student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor
) -> None:
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be [B, T, V]; got shape {tuple(student_logits.shape)}")
    batch_positions = tuple(student_logits.shape[:2])
    if teacher_ids.shape != teacher_logprobs.shape or teacher_ids.dim() != 3:
        raise ValueError(
            f"teacher_ids {tuple(teacher_ids.shape)} and teacher_logprobs {tuple(teacher_logprobs.shape)} "
            f"must both be [B, T, k]"
        )
    for name, tensor in (("teacher_ids", teacher_ids), ("mask", mask)):
        if tuple(tensor.shape[:2]) != batch_positions:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, but student_logits is {tuple(student_logits.shape)}; "
                f"the first two dimensions [B, T] must match"
            )
    if teacher_ids.shape[-1] > student_logits.shape[-1]:
        raise ValueError(
            f"top-k={teacher_ids.shape[-1]} is larger than the student's vocabulary {student_logits.shape[-1]}"
        )


def cross_entropy_per_position(student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Return the cross-entropy at each position whose label is not -100, as a 1-D fp32 tensor.

    Args:
        student_logits: [B, T, V] float; position t predicts labels[:, t].
        labels: [B, T] int64 token ids, already shifted to align with the logits.
    """
    selected = labels != IGNORE_INDEX
    # Select first, so the fp32 log-softmax runs only on the labelled positions.
    return F.cross_entropy(_select(student_logits, selected).float(), labels[selected].long(), reduction="none")


def _select(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Return the [N, V] rows of [B, T, V] `logits` where `mask` is True.

    When every position is selected this is a view, which spares a copy of the logits and, in
    the backward pass, a zero-filled [B, T, V] gradient.
    """
    if bool(mask.all()):
        return logits.flatten(0, 1)
    return logits[mask]


def distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    alpha: float = 0.5,
    loss: str = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    teacher_tail_logprob: torch.Tensor | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> DistillationLoss:
    """Combine alpha * cross-entropy on `labels` with (1 - alpha) * topk_divergence.

    `labels` is [B, T], aligned with the logits like the teacher tensors, with -100 where no
    cross-entropy applies. See topk_divergence for the other arguments. Both parts are computed
    even at alpha 0 or 1, so that they can be logged.

    The loss is a sum over tokens divided by `num_items_in_batch`. Pass the count of target
    tokens over all micro-batches of one optimizer step, and accumulated gradients equal those
    of one large batch. None divides by this batch's own count (a mean over tokens).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be between 0 and 1 (the weight of the cross-entropy term)")
    mask = mask.bool()
    shared = (
        temperature == 1.0 and teacher_ids.shape[-1] < student_logits.shape[-1]
        and labels.shape == mask.shape and bool(torch.equal(labels != IGNORE_INDEX, mask))
    )
    if shared:
        # The usual case: cross-entropy and divergence at the same positions, with a tail class.
        # One pass of _StudentLogProbs gives the student's log-probabilities for both.
        check_loss_settings(loss, beta, temperature)
        _check_target_shapes(student_logits, teacher_ids, teacher_logprobs, mask)
        student = _select(student_logits, mask).float()
        log_q_topk, log_q_tail, log_q_label = _StudentLogProbs.apply(student, teacher_ids[mask].long(), labels[mask].long())
        ce = -log_q_label
        divergence = _selected_divergence(
            student, teacher_ids, teacher_logprobs, mask, teacher_tail_logprob, loss, beta, temperature,
            (log_q_topk, log_q_tail),
        )
    else:
        ce = cross_entropy_per_position(student_logits, labels)
        divergence = topk_divergence(
            student_logits, teacher_ids, teacher_logprobs, mask, loss, beta, temperature, teacher_tail_logprob
        )
    tokens = int(mask.sum())
    if num_items_in_batch is None:
        denominator = max(tokens, 1)
    elif isinstance(num_items_in_batch, torch.Tensor):
        denominator = num_items_in_batch.to(student_logits.device).clamp_min(1)
    else:
        denominator = max(num_items_in_batch, 1)
    # Both sums keep a gradient path to the logits, of value 0, when no position is selected.
    total = (alpha * ce.sum() + (1.0 - alpha) * divergence.sum()) / denominator
    return DistillationLoss(
        loss=total,
        ce=ce.detach().mean() if ce.numel() else ce.detach().sum(),
        divergence=divergence.detach().mean() if divergence.numel() else divergence.detach().sum(),
        tokens=tokens,
    )
