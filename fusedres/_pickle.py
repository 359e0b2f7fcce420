"""The classes ``convert()`` makes at run time (``FusedStem<Name>``, ``FusedTimm<Name>``), made picklable.

Such a class is a subclass of a mixin and of the model's own class, so no module holds it by name: pickle's
usual "save the class by reference" fails, and a fresh process has not made it yet. ``fused_class`` makes
(and caches, one class per (mixin, base) for the process) the class with a ``__reduce_ex__`` that saves
the recipe instead: (mixin, base class, name, class attributes), every part picklable by reference or by
value. Loading calls ``_rebuild``, which remakes (or finds) the class and restores the instance's
``__dict__`` through ``nn.Module.__setstate__``. ``torch.save(model)`` / ``torch.load(weights_only=False)``
and ``copy.deepcopy`` go through it alike.
"""
from typing import Any, Dict, Tuple

_CLASSES: Dict[Tuple[type, type], type] = {}


def fused_class(mixin: type, base: type, name: str, attrs: Dict[str, Any]) -> type:
    """``type(name, (mixin, base), attrs)``, made once per (mixin, base), pickled by its recipe."""
    new = _CLASSES.get((mixin, base))
    if new is None:
        spec = (mixin, base, name, dict(attrs))
        new = _CLASSES[(mixin, base)] = type(name, (mixin, base),
                                             {**attrs, "_fusedres_spec": spec, "__reduce_ex__": _reduce_ex})
    return new


def _reduce_ex(self, protocol: int):
    spec = vars(type(self)).get("_fusedres_spec")
    if spec is None:  # a subclass of a made class: pickled as usual (by reference)
        return object.__reduce_ex__(self, protocol)
    return _rebuild, spec, self.__getstate__()


def _rebuild(mixin: type, base: type, name: str, attrs: Dict[str, Any]):
    """An empty instance of the made class; pickle / deepcopy then pass the saved state to __setstate__."""
    cls = fused_class(mixin, base, name, attrs)
    return cls.__new__(cls)
