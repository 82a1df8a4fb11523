"""GPTQ rounding for int4 MatMulNBits weights, calibrated on the model's own samples.

Round-to-nearest (RTN) rounds every weight on its own. GPTQ rounds one input row of a
weight at a time and moves each row's rounding error onto the rows not yet rounded, in
the proportions that keep the layer's output on the calibration inputs closest to the
fp32 output (the inverse of H = X^T X, X being the layer's inputs). On top of that, each
block's scale is the one of 16 candidates (the block's largest weight over 8, shrunk by
up to 30%) with the least input-weighted rounding error.

On SmolLM2-135M-Instruct this gives block 128 the accuracy of RTN at block 32, and larger
blocks decode faster: fewer scales to read per weight (docs/benchmarks.md).

onnxruntime 1.32 ships a GPTQ (`GPTQWeightOnlyQuantConfig`), but its symmetric path
recomputes each block's scale from the weights it has already rounded. A block whose
rounded weights reach the lowest level then gets another scale and is rounded a second
time: mean NLL 3.51 on SmolLM2-135M at block 128, against 2.55 for plain RTN at block 128
(24 GSM8K test answers). This module therefore writes the MatMulNBits nodes itself.

Calibration inputs are whole token sequences run through the fp32 graph. By default they
are the model's own text: each starts at a random token and continues by sampling at
temperature 1, so no data set is needed and the calibration follows what the model
writes rather than one task's text.
"""

from __future__ import annotations

import copy
import logging
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

log = logging.getLogger(__name__)

DAMPING = 0.01  # added to H's diagonal, as a fraction of its mean, so that H inverts
COLUMN_BLOCK = 128  # input rows rounded as one batch before their errors update the later rows
SCALE_SHRINK = np.linspace(1.0, 0.7, 16)  # candidate scales, as fractions of the largest weight / 8
SAMPLE_TOKENS = 256


def constant_matmuls(model: onnx.ModelProto, exclude: Sequence[str] = ()) -> list[onnx.NodeProto]:
    """Return the MatMul nodes whose second input is a 2-D initializer, except those named in `exclude`."""
    shapes = {tensor.name: tensor.dims for tensor in model.graph.initializer}
    return [node for node in model.graph.node
            if node.op_type == "MatMul" and len(shapes.get(node.input[1], ())) == 2 and node.name not in exclude]


def input_hessians(model: onnx.ModelProto, feeds: Iterable[dict], nodes: list[onnx.NodeProto]
                   ) -> tuple[dict[str, np.ndarray], int]:
    """Return X^T X / tokens for the input X of each node in `nodes`, over all `feeds`, and the token count."""
    import onnxruntime as ort

    names = sorted({node.input[0] for node in nodes})
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in names:
        probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    # Saved with external data, so that models over protobuf's 2 GB limit load too.
    with tempfile.TemporaryDirectory(prefix="edgelm-gptq-") as folder:
        path = Path(folder) / "probe.onnx"
        onnx.save(probe, str(path), save_as_external_data=True, location="probe.onnx.data")
        del probe
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        sums = {name: 0.0 for name in names}
        tokens = 0
        for feed in feeds:
            for name, value in zip(names, session.run(names, feed)):
                rows = value.reshape(-1, value.shape[-1]).astype(np.float64)
                sums[name] = sums[name] + rows.T @ rows
            tokens += int(feed["input_ids"].size)
        del session
    if tokens == 0:
        raise ValueError("GPTQ got no calibration sequences; pass at least one non-empty token sequence")
    widest = max(np.shape(total)[0] for total in sums.values())
    if tokens < widest:
        # X^T X then has rank below its size. Damping keeps it invertible, but the rounding
        # fits these few tokens closely; measured numbers used 32 x 256 tokens.
        log.warning("GPTQ calibrates on %d tokens, fewer than the %d inputs of the widest MatMul; "
                    "raise calibration_samples or pass longer calibration_sequences", tokens, widest)
    return {name: total / tokens for name, total in sums.items()}, tokens


def check_calibration_export(manifest: dict) -> str:
    """Return the export's kv_cache kind; raise ValueError unless GPTQ can run its graph."""
    kind = manifest.get("kv_cache", "dynamic")
    if kind not in ("gqa", "dynamic"):
        raise ValueError(f"GPTQ calibration runs the dynamic or the fused export, not kv_cache {kind!r}; "
                         f"quantize the export_onnx or export_fused folder instead")
    return kind


def check_sequences(sequences: Iterable[Sequence[int]], vocab_size: int, max_positions: int | None
                    ) -> list[list[int]]:
    """Return the calibration sequences as lists of ints, after checking each against the model."""
    checked = []
    for index, sequence in enumerate(sequences):
        ids = [int(token) for token in sequence]
        if not ids:
            raise ValueError(f"calibration sequence {index} is empty; every sequence needs at least one token id")
        bad = next((token for token in ids if not 0 <= token < vocab_size), None)
        if bad is not None:
            raise ValueError(f"calibration sequence {index} contains token id {bad}, outside the vocabulary "
                             f"[0, {vocab_size}); pass ids from this model's tokenizer")
        if max_positions is not None and len(ids) > max_positions:
            raise ValueError(f"calibration sequence {index} has {len(ids)} tokens, more than the model's "
                             f"{max_positions} positions; truncate it")
        checked.append(ids)
    if not checked:
        raise ValueError("GPTQ got no calibration sequences; pass at least one non-empty token sequence")
    return checked


def calibration_feeds(manifest: dict, sequences: Iterable[Sequence[int]]) -> Iterable[dict]:
    """Yield one prefill feed per token sequence for an fp32 export with `manifest`, every position's logits kept."""
    kind = check_calibration_export(manifest)
    layers, heads, head_dim = manifest["num_layers"], manifest["num_kv_heads"], manifest["head_dim"]
    for sequence in sequences:
        input_ids = np.array([list(sequence)], dtype=np.int64)
        length = input_ids.shape[1]
        feed = {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids)}
        if kind == "gqa":
            feed["logits_to_keep"] = np.array([length], dtype=np.int64)
            past = np.zeros((1, heads, length, head_dim), dtype=np.float32)
        else:
            feed["position_ids"] = np.arange(length, dtype=np.int64)[None]
            past = np.zeros((1, heads, 0, head_dim), dtype=np.float32)
        feed.update({f"past_key_values.{layer}.{part}": past for layer in range(layers) for part in ("key", "value")})
        yield feed


def _block_scale(block: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """Choose the scale per output row of `block` [N, rows] with the least importance-weighted error."""
    largest = np.take_along_axis(block, np.abs(block).argmax(1)[:, None], 1)[:, 0]
    # The largest weight, with its sign, maps to code 0, which is -8 after the zero point of 8.
    # So all 16 levels are in use, as in onnxruntime's own symmetric rounding.
    base = np.where(largest == 0, 1.0, largest / -8.0)
    best_error, best_scale = None, base
    for shrink in SCALE_SHRINK:
        scale = base * shrink
        codes = np.clip(np.round(block / scale[:, None]) + 8, 0, 15)
        error = (((codes - 8) * scale[:, None] - block) ** 2 * importance).sum(1)
        if best_error is None:
            best_error, best_scale = error, scale
        else:
            better = error < best_error
            best_error = np.where(better, error, best_error)
            best_scale = np.where(better, scale, best_scale)
    return best_scale


def quantize_weight(weight: np.ndarray, hessian: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ-round `weight` [K, N] (MatMul layout) to int4; return codes [N, K] in 0..15 and scales [N, K blocks].

    The value of code c in a block with scale s is (c - 8) * s.
    """
    work = weight.T.astype(np.float64)  # [N, K]: one column per input row of the MatMul weight
    rows, size = work.shape
    hessian = hessian.copy()
    dead = np.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    work[:, dead] = 0.0
    hessian[np.diag_indices(size)] += DAMPING * np.mean(np.diag(hessian))
    # Upper Cholesky factor of H^-1. Row i contains how the error of input i spreads to the inputs after it.
    inverse = np.linalg.cholesky(np.linalg.inv(hessian)).T
    importance = np.diag(hessian)
    blocks = -(-size // block_size)
    codes = np.zeros((rows, size), dtype=np.uint8)
    scales = np.zeros((rows, blocks), dtype=np.float64)
    span = max(block_size, COLUMN_BLOCK // block_size * block_size)
    for start in range(0, size, span):
        end = min(start + span, size)
        part = work[:, start:end].copy()
        errors = np.zeros_like(part)
        local = inverse[start:end, start:end]
        for i in range(end - start):
            column = start + i
            if column % block_size == 0:
                width = min(block_size, size - column)
                scales[:, column // block_size] = _block_scale(part[:, i:i + width],
                                                               importance[column:column + width])
            scale = scales[:, column // block_size]
            code = np.clip(np.round(part[:, i] / scale) + 8, 0, 15)
            codes[:, column] = code
            error = (part[:, i] - (code - 8) * scale) / local[i, i]
            part[:, i:] -= np.outer(error, local[i, i:])
            errors[:, i] = error
        work[:, end:] -= errors @ inverse[start:end, end:]
    return codes, scales.astype(np.float32)


def pack_int4(codes: np.ndarray, block_size: int) -> np.ndarray:
    """Pack codes [N, K] into MatMulNBits' B layout [N, K blocks, block_size / 2], low nibble first.

    K is padded to whole blocks with code 8, which is zero.
    """
    rows, size = codes.shape
    blocks = -(-size // block_size)
    padded = np.full((rows, blocks * block_size), 8, dtype=np.uint8)
    padded[:, :size] = codes
    pairs = padded.reshape(rows, blocks, block_size // 2, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)


def gptq_int4(model: onnx.ModelProto, hessians: dict[str, np.ndarray], block_size: int,
              accuracy_level: int | None, exclude: Sequence[str] = ()) -> onnx.ModelProto:
    """Return a copy of `model` with each constant-weight MatMul (except `exclude`) as a GPTQ int4 MatMulNBits."""
    model = copy.deepcopy(model)
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    replaced: set[str] = set()
    started = time.perf_counter()
    for node in constant_matmuls(model, exclude):
        weight = numpy_helper.to_array(initializers[node.input[1]])
        size, rows = weight.shape
        codes, scales = quantize_weight(weight, hessians[node.input[0]], block_size)
        base = node.input[1]
        model.graph.initializer.extend([numpy_helper.from_array(pack_int4(codes, block_size), f"{base}_Q4"),
                                        numpy_helper.from_array(scales.reshape(-1), f"{base}_scales")])
        attributes = {"K": size, "N": rows, "bits": 4, "block_size": block_size}
        if accuracy_level is not None:
            attributes["accuracy_level"] = accuracy_level
        replacement = helper.make_node("MatMulNBits", [node.input[0], f"{base}_Q4", f"{base}_scales"],
                                       list(node.output), name=f"{node.name}_Q4", domain="com.microsoft",
                                       **attributes)
        node.CopyFrom(replacement)
        replaced.add(base)
    still_used = {name for node in model.graph.node for name in node.input}
    remaining = [tensor for tensor in model.graph.initializer
                 if tensor.name not in replaced or tensor.name in still_used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(remaining)
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    log.info("GPTQ rounded %d MatMul weights to int4 (block %d) in %.0f s", len(replaced), block_size,
             time.perf_counter() - started)
    return model


def sample_sequences(onnx_dir: str | Path, samples: int, tokens: int = SAMPLE_TOKENS, seed: int = 0
                     ) -> list[list[int]]:
    """Sample `samples` sequences of `tokens` tokens from the fp32 export in `onnx_dir`.

    Each starts at a random token id and continues at temperature 1 with edgelm's runtime.
    """
    from edgelm.runtime import Generator

    generator = Generator.from_pretrained(onnx_dir)
    rng = np.random.default_rng(seed)
    vocab = generator.manifest.vocab_size
    started = time.perf_counter()
    sequences = []
    for _ in range(samples):
        ids = [int(rng.integers(0, vocab))]
        logits, cache = generator.prefill([ids], capacity=tokens)
        while len(ids) < tokens:
            row = logits[0].astype(np.float64)
            probabilities = np.exp(row - row.max())
            ids.append(int(rng.choice(vocab, p=probabilities / probabilities.sum())))
            if len(ids) < tokens:
                logits = generator.decode_step(cache, np.array([ids[-1]], dtype=np.int64))
        sequences.append(ids)
    log.info("sampled %d calibration sequences of %d tokens in %.0f s", samples, tokens,
             time.perf_counter() - started)
    return sequences
