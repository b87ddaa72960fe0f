__version__ = "0.1.0"

# Hand-kept: the stable public API (STYLE.md §9). Everything else is reachable by module path but may change.
from se3nb.fiber import Fiber
from se3nb.graph import Graph
from se3nb.model import ModelConfig, SE3Transformer, SE3TransformerPooled
from se3nb.data import DataConfig, GraphDataModule, QM9DataModule
from se3nb.train import TrainConfig, fit
from se3nb.cli import predict

__all__ = ['Fiber', 'Graph', 'ModelConfig', 'SE3Transformer', 'SE3TransformerPooled', 'DataConfig', 'GraphDataModule',
           'QM9DataModule', 'TrainConfig', 'fit', 'predict']
