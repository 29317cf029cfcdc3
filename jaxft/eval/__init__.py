"""Evaluation in one room: what `python -m jaxft.evaluate` and training's eval points measure.

  evaluation.py  `evaluate(config, workdir)`: loss, answer accuracy and quality of the tuned and the
                 base model on data.eval, written as eval.json, samples.jsonl and eval_report.md;
                 `evaluate_loss`, the eval_loss that training logs
  answers.py     reference answers of eval rows and the exact / normalised / contains matches
  metrics.py     abstention, hallucination, style and calibration rates; bootstrap intervals
  quality.py     scores answers with metrics.py and renders the quality table and reliability plot
  report.py      the Markdown report
  votes.py       the human votes of jaxft.serve's /compare page and their win rates

Serving imports this package (the server draws prompts with `references`, the page's votes are read
here); nothing here imports jaxft.serving.
"""

from jaxft.eval.answers import (Reference, accuracy, answer_accuracy, contains_match, exact_match,
                                normalize, normalized_match, references)
from jaxft.eval.evaluation import REPORT, evaluate, evaluate_loss, output_names, score_answers
from jaxft.eval.report import report
from jaxft.eval.votes import VOTES, read_votes, win_rates

__all__ = ["Reference", "accuracy", "answer_accuracy", "contains_match", "exact_match", "normalize",
           "normalized_match", "references", "REPORT", "evaluate", "evaluate_loss",
           "output_names", "score_answers", "report", "VOTES", "read_votes", "win_rates"]
