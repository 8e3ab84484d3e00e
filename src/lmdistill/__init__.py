"""lmdistill: distill large language models into small students."""

__version__ = "0.1.0"


def train(config, overrides=None):
    """Train from a TrainConfig or a YAML recipe path (+ `key=value` overrides); returns the run folder."""
    from lmdistill.trainer import train as _train

    return _train(config, overrides)


def evaluate(model, data, **kwargs):
    """ROUGE-L of a model on instruction data; see `lmdistill.instruct.evaluate.evaluate`."""
    from lmdistill.instruct.evaluate import evaluate as _evaluate

    return _evaluate(model, data, **kwargs)


__all__ = ["train", "evaluate", "__version__"]
