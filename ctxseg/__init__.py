"""ctxseg: a research kit for contrastive semantic segmentation.

The package holds every reusable piece (datasets, the segmenter, methods, the trainer, metrics);
the notebooks in ``notebooks/`` only orchestrate and show.
"""

__version__ = "0.1.0"
