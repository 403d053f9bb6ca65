"""The paper-claims study, one command; rerunning it resumes (finished runs are cached).

    python studies/paper_claims/run.py            # the full study (estimate: plan.ESTIMATE)
    python studies/paper_claims/run.py --quick    # a plumbing check, ~30 min (REPORT-quick.md)
    python studies/paper_claims/run.py --report   # only regenerate REPORT.md from finished runs

Runs land in ``studies/paper_claims/runs/<config hash>/``; the report is rewritten after
every run, so an interrupted study still has an up-to-date report of what finished.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from plan import FULL, QUICK, Budget, GsmCut, StudyConfig  # noqa: E402
from report import write_report  # noqa: E402
from runner import Study  # noqa: E402

# A plumbing check in a few minutes: two methods, one lr each, 2 steps, tiny eval sets.
SMOKE = StudyConfig(
    name="smoke",
    budget=Budget(cut=GsmCut(train_per=1, val_per=1, id_per=1, ood_per=1), steps=2, batch_size=2, accuracy_limit=2,
                  max_new_tokens=32, limits={"val": 4, "id": 4, "ood": 4, "retention": 4}),
    methods=("lora", "dude"), lr_grid={"lora": [1e-3], "dude": [1e-4]}, max_extensions=0, seeds=[0], ranks=[16],
    control=("lora", "dude"),
)
STUDIES = {"full": FULL, "quick": QUICK, "smoke": SMOKE}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_const", const="quick", dest="study", default="full",
                        help="the plumbing-check subset (LoRA vs DuDe, 4 steps, small eval sets)")
    parser.add_argument("--smoke", action="store_const", const="smoke", dest="study",
                        help="a few-minute plumbing check")
    parser.add_argument("--report", action="store_true", help="only regenerate the report")
    parser.add_argument("--max-runs", type=int, default=None, help="stop after this many runs")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="runs side by side, one thread each (default: 2, or 1 on a 1-core machine)")
    parser.add_argument("--root", type=Path, default=HERE, help="study folder (runs/, data/, report)")
    args = parser.parse_args(argv)
    study = Study(STUDIES[args.study], args.root)
    report = args.root / ("REPORT.md" if args.study == "full" else f"REPORT-{args.study}.md")
    if not args.report:
        lock = threading.Lock()

        def after_each(message: str) -> None:
            with lock:  # workers finish in any order; one report write at a time
                print(message, flush=True)
                if "done" in message or "FAILED" in message:
                    write_report(study, report)

        study.log = after_each
        study.run(args.max_runs, jobs=args.jobs)
        print(f"ran {study.ran}, failed {study.failed}, cached {study.skipped}", flush=True)
    write_report(study, report)
    print(f"wrote {report}", flush=True)
    return 1 if study.failed else 0


if __name__ == "__main__":
    sys.exit(main())
