"""Device arrays for a machine without a GPU: NumPy arrays that refuse to mix with host arrays, as CuPy's do.

CuPy raises TypeError when a function gets a cupy.ndarray and a numpy.ndarray together (`np.maximum(np.full(...),
device_array)`); NumPy standing in for CuPy would quietly compute. `DeviceArray` is an ndarray subclass whose
ufuncs and array functions raise that TypeError when any argument is a host array (0-d arrays and scalars are
allowed, as CuPy allows scalars), so host-only code reached with device arrays fails in CI, not on the first GPU.
`device` is the namespace (`xp`): `device.asarray(host)` uploads, `device.asnumpy(a)` downloads, every other NumPy
function works on device arrays and returns them.

>>> a = device.asarray(np.arange(3.0))
>>> (a * 2).tolist(), type(a + a).__name__
([0.0, 2.0, 4.0], 'DeviceArray')
>>> np.maximum(np.zeros(3), a)
Traceback (most recent call last):
...
TypeError: maximum: a host numpy.ndarray mixed with device arrays (CuPy refuses this; copy it with xp.asarray)
"""

from __future__ import annotations

import numpy as np


def _refuse_host(values, name: str) -> None:
    for v in values:
        if isinstance(v, (list, tuple)):
            _refuse_host(v, name)
        elif type(v) is np.ndarray and v.ndim > 0:
            raise TypeError(
                f"{name}: a host numpy.ndarray mixed with device arrays (CuPy refuses this; copy it with xp.asarray)"
            )


def _host(v):
    if isinstance(v, DeviceArray):
        return v.view(np.ndarray)
    if isinstance(v, tuple):
        return tuple(_host(x) for x in v)
    return v


def _device(v):
    if type(v) is np.ndarray:
        return v.view(DeviceArray)
    if isinstance(v, tuple):
        return tuple(_device(x) for x in v)
    return v


class DeviceArray(np.ndarray):
    """An ndarray standing for device memory (see the module's docstring)."""

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        _refuse_host(inputs + (out or ()), ufunc.__name__)
        if out is not None:
            kwargs["out"] = _host(out)
        result = getattr(ufunc, method)(*_host(inputs), **kwargs)
        return out[0] if out is not None and len(out) == 1 else _device(result)

    def __array_function__(self, func, types, args, kwargs):
        _refuse_host(list(args) + list(kwargs.values()), func.__name__)
        return super().__array_function__(func, types, args, kwargs)

    def get(self) -> np.ndarray:  # cupy.ndarray.get(): a host copy
        return np.array(self.view(np.ndarray))


class _Generator:
    """cupy.random.Generator's face: draws land on the device."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def __getattr__(self, name):
        draw = getattr(self.rng, name)
        return lambda *args, **kwargs: _device(np.asarray(draw(*args, **kwargs)))


class _Random:
    default_rng = staticmethod(_Generator)


class DeviceNamespace:
    """`xp` for device arrays: NumPy's functions, host arrays refused except by the explicit copies."""

    ndarray = DeviceArray
    random = _Random()

    @staticmethod
    def asarray(a, dtype=None) -> DeviceArray:  # host -> device (a copy), or a device array as it is
        if isinstance(a, DeviceArray) and (dtype is None or a.dtype == dtype):
            return a
        return np.array(_host(a), dtype=dtype, copy=True).view(DeviceArray)

    array = asarray

    @staticmethod
    def asnumpy(a) -> np.ndarray:  # device -> host (a copy)
        return np.array(_host(a))

    def __getattr__(self, name):
        f = getattr(np, name)
        if not callable(f) or isinstance(f, type):
            return f

        def on_device(*args, **kwargs):
            _refuse_host(list(args) + list(kwargs.values()), name)
            return _device(f(*args, **kwargs))

        return on_device


device = DeviceNamespace()


class OnDevice:
    """An ops object computing on the host (NumpyTwins) seen from the orchestration as a device: its results are
    device arrays, and it refuses host arrays where CudaKernels would (everything but the host-given uniform numbers
    and forced ids of filter_sample). What runs inside the ops is its own business; what the orchestration hands it
    and does with its results must be device arrays, as on a GPU."""

    HOST_ARGS = {"filter_sample": (5, 6)}  # (u, forced): host arrays CudaKernels uploads itself

    def __init__(self, ops):
        self.ops, self.xp = ops, device

    def to_numpy(self, a) -> np.ndarray:
        if type(a) is np.ndarray:
            raise TypeError("to_numpy: a host array, where a device array was expected")
        return device.asnumpy(a)

    def rng(self, seed: int):
        return device.random.default_rng(seed)

    def __getattr__(self, name):
        f = getattr(self.ops, name)
        if not callable(f):
            return f

        def on_device(*args, **kwargs):
            allowed = self.HOST_ARGS.get(name, ())
            _refuse_host([a for i, a in enumerate(args) if i not in allowed] + list(kwargs.values()), name)
            return _device(f(*_host(tuple(args)), **kwargs))

        return on_device
