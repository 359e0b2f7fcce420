"""Launch hygiene (issue 9): aten ops and Triton launches per ResNet-50 eval forward and training step,
fused and eager, counted on the host (fusedres._counts) at batch 2, 32x32, and pinned as budgets.

On CPU the Triton launches are counted but not run (counting needs no results), so this takes seconds.
A budget that the code does not meet yet xfails at run time, with the counts in the message, and
passes by itself once the count is within it; a count that is met today is a hard assertion.
"""
import pytest

from fusedres import _counts

EVAL_ATEN_BUDGET = 60         # ~1 aten op per fused conv (its output allocation), plus the head
CONVS = 53                    # convolutions in a ResNet-50 (49 fused launches: projections ride along)
TRAIN_LAUNCH_BUDGET = 8 * CONVS  # measured 364, then 382 with phase-split dgrad (2026-11-27)
TRAIN_ATEN_BUDGET = 1750      # measured 1705 at the same commit: a ceiling against regressions


@pytest.fixture(scope="module")
def rows():
    return _counts.resnet50_counts(batch=2, size=32)


def _table(rows) -> str:
    return "\n" + _counts.format_table(rows)


def _within(count: int, budget: int, what: str, rows) -> None:
    """xfail (not fail) while the budget is not met yet: other work is bringing the count down."""
    if count > budget:
        pytest.xfail(f"{what}: {count} > budget {budget}{_table(rows)}")


def test_the_counter_sees_eager_convolutions_and_fused_launches(rows):
    """The counts are not vacuous: eager runs aten convolutions, the fused path Triton kernels only."""
    eager, fused = rows["eager eval forward"], rows["fused eval forward"]
    assert eager.aten["aten.convolution.default"] == CONVS, _table(rows)
    assert eager.triton_launches == 0 and rows["eager train step"].triton_launches == 0, _table(rows)
    assert not any("convolution" in op or "batch_norm" in op for op in fused.aten), _table(rows)
    assert 0 < fused.triton_launches <= CONVS, _table(rows)
    assert rows["fused train step"].launches["_conv_wgrad_kernel"] >= 1, _table(rows)


def test_eval_forward_aten_ops_within_budget(rows):
    count = rows["fused eval forward"].aten_ops
    _within(count, EVAL_ATEN_BUDGET, "aten ops per fused ResNet-50 eval forward", rows)


def test_train_step_materializes_no_zero_gradients(rows):
    """Autograd must not materialize zero gradients for the chain ops' unused outputs."""
    zeros = [(op, s) for op, s in rows["fused train step"].activation_zeros if op.startswith(_counts.AUTOGRAD_ZEROS)]
    assert zeros == [], f"zero gradients materialized: {zeros}{_table(rows)}"


def test_train_step_makes_no_identity_scale_shift(rows):
    """STATS convs need no ones/zeros scale and shift (nor any other per-channel zero fill)."""
    step = rows["fused train step"]
    vectors = [z for z in step.zeros if len(z[1]) < 2]
    assert step.aten["aten.ones.default"] == 0 and vectors == [], \
        f"aten.ones {step.aten['aten.ones.default']}, 1-D zero fills {vectors}{_table(rows)}"


def test_train_step_zero_fills_no_activation(rows):
    """Nothing activation-sized is zero-filled (e.g. a padded stem input: a memset plus a copy)."""
    zeros = rows["fused train step"].activation_zeros
    _within(len(zeros), 0, f"activation-sized zero fills per fused training step {zeros}", rows)


def test_train_step_clones_no_running_statistics(rows):
    step = rows["fused train step"]
    _within(step.aten["aten.clone.default"], 0, "aten.clone per fused training step", rows)


def test_train_step_launches_and_aten_ops_within_budget(rows):
    step = rows["fused train step"]
    assert step.triton_launches <= TRAIN_LAUNCH_BUDGET, \
        f"Triton launches per training step: {step.triton_launches} > {TRAIN_LAUNCH_BUDGET}{_table(rows)}"
    assert step.aten_ops <= TRAIN_ATEN_BUDGET, \
        f"aten ops per training step: {step.aten_ops} > {TRAIN_ATEN_BUDGET}{_table(rows)}"
