"""The quality gate export applies: keep the samples whose evaluation scores pass the thresholds.

It reads ``samples.jsonl`` of the run's evaluation (``handsynth evaluate``; default ``<run>/evaluation``)
and refuses a run that was not evaluated, an evaluation without keypoint scores, or one that misses
some of the run's samples (evaluated before they were generated).

A sample passes when its lowest hand score is >= ``min_hand_score`` and its largest 2D keypoint error
(hand sizes) is <= ``max_keypoint_error``, each test only when its threshold is given (a hand that was not
detected scores 0 and has no keypoint error). A dropped sample is counted under one reason:
``hand_not_detected`` (a test failed because a hand was not detected), ``hand_score_below_min``,
``keypoint_error_above_max``.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from handsynth import io
from handsynth.errors import InputError

EVALUATION = "evaluation"


@dataclass(frozen=True)
class Gate:
    min_hand_score: float | None = None
    max_keypoint_error: float | None = None
    evaluation: Path | None = None          # default: <run>/evaluation

    def folder(self, run: Path) -> Path:
        return Path(self.evaluation) if self.evaluation is not None else Path(run) / EVALUATION

    def identity(self) -> dict[str, Any]:
        return {"min_hand_score": self.min_hand_score, "max_keypoint_error": self.max_keypoint_error}

    def verdict(self, score: dict[str, Any]) -> str | None:
        """None when the sample passes, else the reason it is dropped (an undetected hand scores 0 and has no
        keypoint error: it fails either test as ``hand_not_detected``)."""
        undetected = any(not h.get("detected") for h in score.get("hands", []))
        if self.min_hand_score is not None and score["hand_score"] < self.min_hand_score:
            return "hand_not_detected" if undetected else "hand_score_below_min"
        error = score.get("keypoint_error")
        if self.max_keypoint_error is not None and (error is None or error > self.max_keypoint_error):
            return "hand_not_detected" if error is None else "keypoint_error_above_max"
        return None


def read_scores(run: Path, folder: Path) -> dict[str, dict[str, Any]]:
    """The evaluation's per-sample scores by sample key; InputError when the run has none to filter on."""
    evaluate = f"run `handsynth evaluate --run {run}` first (with the hand model: `handsynth evaluate " \
               "--build-hand-model`)"
    summary_path, samples_path = folder / "summary.json", folder / "samples.jsonl"
    if not summary_path.is_file() or not samples_path.is_file():
        raise InputError("the run has not been evaluated, so there are no scores to filter on", where=folder,
                         fix=evaluate)
    summary = io.read_json(summary_path, what="evaluation summary")
    if summary.get("status") != "complete":
        raise InputError("the evaluation did not finish", where=summary_path, fix=evaluate)
    if "keypoints" in (summary.get("skipped") or {}):
        raise InputError("the evaluation has no hand scores (it ran without the hand model: "
                         f"{summary['skipped']['keypoints']})", where=summary_path, fix=evaluate)
    scores = {}
    for n, line in enumerate(samples_path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
            scores[record["key"]] = record
        except (json.JSONDecodeError, KeyError, TypeError):
            raise InputError(f"line {n} is not a sample score record", where=samples_path, fix=evaluate) from None
    return scores


def apply(gate: Gate, run: Path, samples: list) -> tuple[list, dict[str, Any]]:
    """(kept samples, the record for index.json) for export's ``samples`` (objects with ``.key``)."""
    folder = gate.folder(run)
    scores = read_scores(run, folder)
    missing = [s.key for s in samples if s.key not in scores or "hand_score" not in scores[s.key]]
    if missing:
        raise InputError(f"the evaluation has no scores for {len(missing)} of the run's samples, e.g. "
                         f"{missing[0]} (it predates them)", where=folder / "samples.jsonl",
                         fix=f"rerun `handsynth evaluate --run {run}`: it reuses the scores it already has")
    kept, dropped, dropped_keys = [], Counter(), []
    for sample in samples:
        reason = gate.verdict(scores[sample.key])
        if reason is None:
            kept.append(sample)
        else:
            dropped[reason] += 1
            dropped_keys.append(sample.key)
    record = {**gate.identity(), "evaluation": str(folder.resolve()), "kept": len(kept),
              "dropped": dict(sorted(dropped.items())), "dropped_keys": dropped_keys}
    return kept, record
