__version__ = "0.1.0"

# Hand-kept: the stable public API (STYLE.md §9). Everything else is reachable by module path but may change.
# The names load on first use (PEP 562): `import se3nb` stays light, and `python -m se3nb.train` / `-m se3nb.qm9`
# run their module once, without runpy's "found in sys.modules" warning.
import importlib.util  # binds importlib too
from typing import TYPE_CHECKING

_PUBLIC = {
    'Fiber': 'se3nb.fiber',
    'Graph': 'se3nb.graph',
    'ModelConfig': 'se3nb.model',
    'SE3Transformer': 'se3nb.model',
    'SE3TransformerPooled': 'se3nb.model',
    'DataConfig': 'se3nb.data',
    'GraphDataModule': 'se3nb.data',
    'QM9DataModule': 'se3nb.data',
    'TrainConfig': 'se3nb.train',
    'fit': 'se3nb.train',
    'predict': 'se3nb.cli',
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    if not name.startswith('_') and importlib.util.find_spec(f'se3nb.{name}') is not None:
        return importlib.import_module(f'se3nb.{name}')  # `import se3nb; se3nb.model.X` keeps working
    raise AttributeError(f"module 'se3nb' has no attribute {name!r}; the public names are {__all__}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs, which do not run __getattr__ ('X as X': a re-export)
    from se3nb.cli import predict as predict
    from se3nb.data import DataConfig as DataConfig, GraphDataModule as GraphDataModule, QM9DataModule as QM9DataModule
    from se3nb.fiber import Fiber as Fiber
    from se3nb.graph import Graph as Graph
    from se3nb.model import (
        ModelConfig as ModelConfig,
        SE3Transformer as SE3Transformer,
        SE3TransformerPooled as SE3TransformerPooled,
    )
    from se3nb.train import TrainConfig as TrainConfig, fit as fit
