"""sbmae.tools.compare: the full-vs-reduced table and plot from run folders."""

import json

import pytest

from sbmae.tools import compare


def _write_run(root, coherence, reduction=None):
  metrics = {f"coherence/conditional_k{k + 1}": c for k, c in enumerate(coherence)}
  metrics.update({"coherence/conditional_mean": sum(coherence) / len(coherence),
                  "coherence/unconditional": 0.25, "fd_clf/m0": 12.5, "fd_clf/m10": 3.0,
                  "coherence/reconstruction_m0": 0.5, "coherence/reconstruction_m10": 1.0})
  (root / "eval").mkdir(parents=True)
  (root / "eval" / "metrics.json").write_text(json.dumps({"metrics": metrics}))
  if reduction:
    (root / "reduce").mkdir()
    (root / "reduce" / "reduction.json").write_text(json.dumps(reduction))
  return root


def test_table_rows_hold_each_runs_numbers(tmp_path):
  runs = {
      "full": compare.load_run(_write_run(tmp_path / "a", [0.5, 0.625])),
      "reduced": compare.load_run(_write_run(tmp_path / "b", [0.75, 0.875],
                                             {"ranks": [3, 4], "estimated_kl_bound": 0.4321})),
  }
  lines = compare.table(runs).splitlines()
  assert lines[0].split(" | ")[4:6] == ["k=1", "k=2"]
  # fd_clf columns in modality order (m0 before m10), not string order.
  assert lines[0].index("fd_clf m0") < lines[0].index("fd_clf m10")
  full = [c.strip() for c in lines[2].strip("|").split("|")]
  reduced = [c.strip() for c in lines[3].strip("|").split("|")]
  assert full[:8] == ["full", "full", "-", "0.750", "0.500", "0.625", "0.562", "0.250"]
  assert reduced[:8] == ["reduced", "7 (3/4)", "0.432", "0.750", "0.750", "0.875", "0.812",
                         "0.250"]
  assert reduced[8:] == ["12.5", "3.0"]
  compare.plot_coherence({k: m for k, (m, _) in runs.items()}, tmp_path / "c.png")
  assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_missing_evaluation_names_the_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="eval/metrics.json"):
    compare.load_run(tmp_path)
