"""What the modules' per-token calls keep between tokens: the parameter lists their step kernels
take, made once and made again only when the parameters may have changed.

Parameters and submodules registered on any module of this process are counted (torch's global
registration hooks), so a cache of a module's parameter objects can tell when one may have
been replaced: setattr, a parametrization, ``load_state_dict(assign=True)``.
"""
from typing import Callable, Optional

from torch import Tensor
from torch.nn import Module
from torch.nn.modules.module import register_module_module_registration_hook, register_module_parameter_registration_hook

_registrations = 0


def _count_registration(*_) -> None:
    global _registrations
    _registrations += 1


register_module_parameter_registration_hook(_count_registration)
register_module_module_registration_hook(_count_registration)


def registered_or_attribute(module: Module, name: str) -> Tensor:
    """module.<name>: the registered parameter itself when there is one (a dict read, where the
    attribute costs nn.Module.__getattr__'s lookups), else the attribute (a parametrization's
    value, say)."""
    parameter = module._parameters.get(name)
    return getattr(module, name) if parameter is None else parameter


class StepCache:
    """A list of a module's parameters (or of values derived from them) for a step kernel.

    ``get(build, derived_from=None)`` returns the list ``build()`` made, made again when a
    parameter or submodule has been registered anywhere since, and, when the list holds a
    value computed from the tensor ``derived_from`` (Mamba's A = -exp(A_log)), when that
    tensor has changed in place (its version counter: ``load_state_dict``, an optimizer
    step) or moved (its storage: ``module.to``, ``.data =``). The parameters themselves are
    held, not copied, so in-place changes of them need nothing; writes through ``p.data``,
    which autograd does not see either, are not seen in derived values.
    """

    def __init__(self) -> None:
        self._key: Optional[tuple] = None
        self._value: Optional[list] = None

    def get(self, build: Callable[[], Optional[list]], derived_from: Optional[Tensor] = None) -> Optional[list]:
        key = _registrations if derived_from is None else (_registrations, derived_from._version,
                                                           derived_from.data_ptr())
        if key != self._key:
            self._key, self._value = key, build()
        return self._value
