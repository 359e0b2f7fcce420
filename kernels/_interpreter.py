"""Triton's interpreter (TRITON_INTERPRET=1) beside numpy >= 2.4.

The interpreter holds a kernel's scalars as 1-element numpy arrays. Triton before 3.7 turns one into a Python
int with ``int(array)`` (``tensor.__index__``: a runtime loop bound such as the conv kernels' ``range(num_k)``);
numpy 2.4 made converting an array with ndim > 0 a TypeError, so every conv kernel failed in triton 3.6's
interpreter beside numpy >= 2.4 (the GPU image: triton 3.6, numpy 2.5.2; triton-lang/triton#9171, fixed upstream by
squeezing the array first). ``patch_scalar_index`` does the same in the interpreter's patch of ``tl.tensor``.
"""
import numpy as np


def _numpy_rejects_1d_scalars() -> bool:
    try:
        int(np.zeros(1, dtype=np.int32))
    except TypeError:
        return True
    return False


def patch_scalar_index() -> bool:
    """Make the interpreter's ``tl.tensor.__index__`` squeeze its 1-element array first, where numpy needs it and
    this triton's interpreter has the patch hook; True when patched. Restored with the interpreter's own patches
    after each launch (its scope undoes changes in reverse order)."""
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "_fusedres_squeezed", False) or not _numpy_rejects_1d_scalars():
        return False

    def patch_lang_tensor(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).squeeze()))

    patch_lang_tensor._fusedres_squeezed = True
    interpreter._patch_lang_tensor = patch_lang_tensor
    return True
