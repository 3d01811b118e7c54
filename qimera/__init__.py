"""qimera: data-free quantization with synthetic boundary supporting samples.

The one obvious call::

    import qimera
    result = qimera.run("configs/demo.yaml", ["quant.w_bits=4"])
    print(result.summary())

The package is pure PyTorch; pipeline tools (DVC, MLflow, Prefect, S3) live outside it.
Top-level names are imported lazily so that ``import qimera.quant`` stays light.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "run": "api", "prepare": "api", "Prepared": "api", "RunResult": "api",
    "Config": "config", "ConfigError": "config", "load_config": "config",
    "quantize_model": "quant",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'qimera' has no attribute {name!r}")
