#!/usr/bin/env python3
"""Runs TorchServe's own API suites (../shared/torchserve-suite, newman) against oxserve and fails
on every test that passes on TorchServe 0.12.0 and fails on oxserve, unless that test is listed,
with its reason, in .ci/torchserve-suite-expected-failures.tsv.

    .ci/torchserve-suite.py [--no-run] [SUITE ...]

OXSERVE_BIN (default target/debug/oxserve) is the server; TORCHSERVE_SUITE (default
../shared/torchserve-suite) the harness. --no-run only checks the reports of an earlier run
(target/torchserve-suite/reports/oxserve/*.tsv). Expected failures that now pass are listed at the
end ("now passing: remove from the list"), so the list only ever shrinks.

The list's lines: SUITE <TAB> ITERATION <TAB> REQUEST <TAB> TEST <TAB> REASON. `*` in ITERATION,
REQUEST and TEST matches anything (a whole suite that is open work). Blank lines and lines starting
with # are comments. The key (iteration, request, test) is the one compare.py uses.
"""
import csv
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE_DIR = os.environ.get("TORCHSERVE_SUITE", os.path.join(ROOT, "..", "shared", "torchserve-suite"))
EXPECTED = os.path.join(ROOT, ".ci", "torchserve-suite-expected-failures.tsv")
OUT = os.environ.get("SUITE_OUT", os.path.join(ROOT, "target", "torchserve-suite"))
ALL = ["management", "inference", "increased_timeout_inference", "https", "management_kf", "inference_kf",
       "https_kf", "inference_kfv2", "https_kfv2", "explanation", "workflow", "workflow_inference"]


def load_tsv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def load_expected():
    rules = []
    with open(EXPECTED) as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip() or line.startswith("#"):
                continue
            parts = line.split("\t")
            if len(parts) != 5 or not parts[4].strip():
                sys.exit(f"{EXPECTED}:{n}: want 5 tab-separated fields, the last a reason: {line!r}")
            rules.append(dict(suite=parts[0], iteration=parts[1], item=parts[2], test=parts[3],
                              reason=parts[4], line=n, used=False))
    return rules


def matches(rule, suite, row):
    return (rule["suite"] == suite
            and rule["iteration"] in ("*", row["iteration"])
            and rule["item"] in ("*", row["item"])
            and rule["test"] in ("*", row["test"]))


def main():
    args = sys.argv[1:]
    run = "--no-run" not in args
    suites = [a for a in args if not a.startswith("--")] or ALL
    env = dict(os.environ)
    env.setdefault("OXSERVE_BIN", os.path.join(ROOT, "target", "debug", "oxserve"))
    if run:
        # run.sh starts each suite's server, runs newman, stops it; its exit status says nothing
        # about the tests (the reports do)
        # about the tests (the reports do). Its own "SUITE: N passed, M failed" lines count expected
        # failures too, so they go to a log file rather than CI's output, which the summary below
        # states exactly.
        os.makedirs(OUT, exist_ok=True)
        log = os.path.join(OUT, "run.log")
        with open(log, "w") as f:
            subprocess.run([os.path.join(SUITE_DIR, "run.sh"), "oxserve", *suites], cwd=ROOT, env=env,
                           check=False, stdout=f, stderr=subprocess.STDOUT)
        print(f"newman output: {log}")
    rules = load_expected()
    regressions, table = [], []
    total_passed, total_expected = 0, 0
    for suite in suites:
        baseline = load_tsv(os.path.join(SUITE_DIR, "baseline-torchserve-0.12.0", suite + ".tsv"))
        report = os.path.join(OUT, "reports", "oxserve", suite + ".tsv")
        got = {}
        if os.path.exists(report):
            for r in load_tsv(report):
                got[(r["iteration"], r["item"], r["test"])] = r
        passed = 0
        ts_pass = [r for r in baseline if r["result"] == "PASS"]
        for r in ts_pass:
            mine = got.get((r["iteration"], r["item"], r["test"]))
            ok = mine is not None and mine["result"] == "PASS"
            passed += ok
            total_passed += ok
            rule = next((x for x in rules if matches(x, suite, r)), None)
            if rule is not None:
                if ok and rule["iteration"] != "*":
                    rule["now_passing"] = True
                rule["used"] = True
                total_expected += not ok
                continue
            if not ok:
                answer = f"{mine['code']} {mine['body'][:200]}" if mine else "(no result)"
                regressions.append(f"{suite} [{r['iteration']}] {r['label']} / {r['item']} / {r['test']}\n"
                                   f"    {r['method']} {r['url']}\n"
                                   f"    TorchServe: {r['code']} {r['body'][:200]}\n"
                                   f"    oxserve:    {answer}")
        table.append(f"| {suite} | {len(ts_pass)} / {len(baseline)} | {passed} |")
    print("\n| suite | TorchServe 0.12.0 | oxserve |\n|---|---|---|")
    print("\n".join(table))
    stale = [x for x in rules if x.get("now_passing")]
    if stale:
        print("\nExpected failures that now pass (remove them from the list):")
        for x in stale:
            print(f"  line {x['line']}: {x['suite']} [{x['iteration']}] {x['item']} / {x['test']}")
    if regressions:
        print(f"\n{len(regressions)} test(s) pass on TorchServe and fail on oxserve, and are not in {EXPECTED}:")
        print("\n".join(regressions))
        print(f"torchserve-suite: {total_passed} passed, {len(regressions)} failed")
        return 1
    print("\nNo regression against TorchServe 0.12.0 outside the expected-failure list "
          f"({total_expected} listed failures, each with its reason).")
    print(f"torchserve-suite: {total_passed} passed, 0 failed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
