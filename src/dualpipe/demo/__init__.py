"""Demo: train a small GPT with a pipeline schedule on local CPU processes.

``python -m dualpipe demo [options]`` (or ``make demo``) runs :func:`main`; see
:mod:`dualpipe.demo.run` for the options. The pieces are reusable:

* :mod:`dualpipe.demo.model`: a small GPT and :func:`~dualpipe.demo.model.gpt_stages`,
  its split into pipeline stages;
* :mod:`dualpipe.demo.task`: the synthetic copy task;
* :mod:`dualpipe.demo.train`: one rank's training loop with the gradient check;
* :mod:`dualpipe.demo.report`: the summary, loss curve and timeline files.
"""

from __future__ import annotations

from .run import main

__all__ = ["main"]
