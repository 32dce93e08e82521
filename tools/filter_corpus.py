"""Drop low-quality documents from a JSONL corpus with Gopher's heuristic rules.

    python tools/filter_corpus.py --input corpus.jsonl --output filtered.jsonl --workers 2

Each rule has a flag whose default is Gopher's threshold (Rae et al. 2021, arXiv:2112.11446, appendix
A.1.1 and table A1; see megatron_lite/data/curation/quality.py); pass `none` to switch one off. A document
failing any rule is dropped. The report (JSON) counts, per rule, the documents that fail it and the
documents it alone removes (first failing rule, in flag order), with a few examples of each.
"""

import argparse
import sys
from dataclasses import fields

from megatron_lite.data.curation import common
from megatron_lite.data.curation.quality import RULES, Thresholds, check
from megatron_lite.errors import ConfigError

EXAMPLES_PER_RULE = 3
EXAMPLE_CHARS = 120
_worker = {}


def _number(kind):
    def parse(value):
        return None if value.lower() == "none" else kind(value)
    return parse


def _ngram_limits(value):
    if value.lower() == "none":
        return None
    try:
        return {int(n): float(f) for n, f in (item.split(":") for item in value.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: expected N:FRACTION[,N:FRACTION...], e.g. 2:0.2,3:0.18")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_args(p)
    g = p.add_argument_group("rules (Gopher's thresholds; 'none' switches a rule off)")
    defaults = Thresholds()
    for f in fields(Thresholds):
        default = getattr(defaults, f.name)
        if isinstance(default, dict):
            kind, shown = _ngram_limits, ",".join(f"{n}:{v}" for n, v in default.items())
        else:
            kind, shown = _number(type(default)), default
        g.add_argument("--" + f.name.replace("_", "-"), type=kind, default=default,
                       help=f"default {shown}")
    return p


def check_args(args) -> None:
    common.check_common_args(args)
    for name in RULES:
        value = getattr(args, name)
        values = value.values() if isinstance(value, dict) else [value]
        if any(v is not None and v < 0 for v in values):
            raise ConfigError(f"--{name.replace('_', '-')} {value}: must not be negative")


def init_worker(key, thresholds) -> None:
    _worker.update(key=key, thresholds=thresholds)


def check_batch(batch):
    good, bad = common.parse_batch(batch, _worker["key"])
    return [(lineno, raw, check(text, _worker["thresholds"]), text[:EXAMPLE_CHARS])
            for lineno, raw, text in good], bad


def run(args) -> dict:
    check_args(args)
    thresholds = Thresholds(**{name: getattr(args, name) for name in RULES})
    progress = common.Progress(args.input, args.log_interval)
    bad_lines = common.BadLines(args.input, args.strict)
    failing = {name: 0 for name in RULES}
    removed_by = {name: 0 for name in RULES}
    examples = {name: [] for name in RULES}
    stats = dict(documents=0, kept=0, removed=0)
    with common.jsonl_writer(args.output) as out:
        results = common.ordered_map(check_batch, common.read_batches(args.input, progress), args.workers,
                                     init_worker, (args.json_key, thresholds))
        for docs, bad in results:
            bad_lines.add(bad)
            for lineno, raw, failed, example in docs:
                stats["documents"] += 1
                if not failed:
                    common.write_line(out, raw)
                    stats["kept"] += 1
                    continue
                stats["removed"] += 1
                for name in failed:
                    failing[name] += 1
                first = min(failed, key=RULES.index)
                removed_by[first] += 1
                if len(examples[first]) < EXAMPLES_PER_RULE:
                    examples[first].append(dict(line=lineno, failed=failed, example=example))
            progress.advance(len(docs))
    stats.update(skipped=bad_lines.count, docs_per_s=round(progress.docs_per_s, 1))
    common.write_report(args.report, dict(
        input=args.input, output=args.output, thresholds={n: getattr(thresholds, n) for n in RULES}, **stats,
        failing_per_rule=failing, removed_per_rule=removed_by,
        examples={n: e for n, e in examples.items() if e}))
    stats["removed_per_rule"] = {n: c for n, c in removed_by.items() if c}
    return stats


def main(argv=None) -> int:
    def by_rule(s) -> str:
        return "removed by rule: " + (" ".join(f"{n}={c}" for n, c in s["removed_per_rule"].items()) or "none")

    return common.tool_main(build_parser, run, argv, ("documents", "kept", "removed", "skipped", "docs_per_s"),
                            extra=by_rule)


if __name__ == "__main__":
    sys.exit(main())
