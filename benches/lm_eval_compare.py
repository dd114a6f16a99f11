#!/usr/bin/env python3
"""Reference side of the `peft-wit eval` vs lm-evaluation-harness comparison.

Subcommands (driven by benches/lm_eval_compare.sh):

  write-tasks   Copy the harness's own task YAMLs for mmlu (default variant),
                bbh_cot_fewshot, gsm8k and ifeval into a directory for
                `lm_eval --include_path`, changing only where the data comes
                from (local files in the original repositories' layouts) and
                prefixing task/group/tag names with `local_` so they do not
                clash with the built-in ones. Prompt templates, few-shot
                settings, stop strings, filters and metrics are carried over
                verbatim; `verify` checks that.
  verify        Re-resolve the written YAMLs and the harness's YAMLs and
                report every field that differs (expected: only dataset
                location fields and names).
  fewshot       Replay the harness's few-shot sampler for gsm8k (seeded
                random.Random(1234), one .sample(train, 5) call per test doc in
                doc order) and write the chosen train indices.
  compare       Match the harness's --log_samples output with peft-wit's
                --log-samples output by (task, doc_id) and print the table.

Only the standard library is needed for `compare`; the other subcommands need
PyYAML (present wherever lm-eval is installed).
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import sys
from collections import OrderedDict, defaultdict

PREFIX = "local_"
GROUPS = ("mmlu", "bbh", "gsm8k", "ifeval")
# lm_eval task / group name requested for each group
HARNESS_TASK_FOR_GROUP = {
    "mmlu": PREFIX + "mmlu",
    "bbh": PREFIX + "bbh_cot_fewshot",
    "gsm8k": PREFIX + "gsm8k",
    "ifeval": PREFIX + "ifeval",
}
# metrics shown in the table, first one is the headline
GROUP_METRICS = {
    "mmlu": ["acc,none"],
    "bbh": ["exact_match,get-answer"],
    "gsm8k": ["exact_match,strict-match", "exact_match,flexible-extract"],
    "ifeval": [
        "prompt_level_strict_acc,none",
        "inst_level_strict_acc,none",
        "prompt_level_loose_acc,none",
        "inst_level_loose_acc,none",
    ],
}

# ----------------------------------------------------------------------------
# YAML with the harness's `!function` tag kept as an opaque value
# ----------------------------------------------------------------------------


_YAML = None


def _yaml():
    global _YAML
    if _YAML is not None:
        return _YAML
    import yaml

    class FunctionTag(str):
        pass

    class Loader(yaml.SafeLoader):
        pass

    class Dumper(yaml.SafeDumper):
        pass

    def construct_function(loader, node):
        return FunctionTag(loader.construct_scalar(node))

    def represent_function(dumper, data):
        return dumper.represent_scalar("!function", str(data))

    Loader.add_constructor("!function", construct_function)
    Dumper.add_representer(FunctionTag, represent_function)
    _YAML = (yaml, Loader, Dumper, FunctionTag)
    return _YAML


def load_yaml(path):
    yaml, Loader, _, _ = _yaml()
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=Loader)


def dump_yaml(obj, path):
    yaml, _, Dumper, _ = _yaml()
    with open(path, "w", encoding="utf-8") as f:
        yaml.dump(
            obj,
            f,
            Dumper=Dumper,
            sort_keys=False,
            allow_unicode=True,
            width=float("inf"),
            default_flow_style=False,
        )


def function_tag(name):
    _, _, _, FunctionTag = _yaml()
    return FunctionTag(name)


def resolve_yaml(path):
    """Config dict of a task YAML with its `include` chain merged (child wins)."""
    cfg = load_yaml(path)
    inc = cfg.pop("include", None)
    if inc:
        base = resolve_yaml(os.path.join(os.path.dirname(path), inc))
        base.update(cfg)
        cfg = base
    return cfg


def harness_tasks_dir(arg):
    if arg:
        return arg
    import lm_eval  # noqa: F401

    return os.path.join(os.path.dirname(lm_eval.__file__), "tasks")


# ----------------------------------------------------------------------------
# write-tasks
# ----------------------------------------------------------------------------

MMLU_UTILS = '''"""Loader for the local copy of MMLU (original hendrycks CSV layout).

The CSVs have no header: question,A,B,C,D,answer (answer is a letter).  The
harness's mmlu templates read the cais/mmlu fields `question`, `choices`
(list of 4 strings) and `answer` (int 0-3); this builds exactly those, with
Python's csv module so that no field is reinterpreted (pandas would turn
"None"/"NA" into NaN and all-numeric columns into numbers).
"""
import csv

import datasets


def _read(path):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    for r in rows:
        assert len(r) == 6, (path, r)
    return datasets.Dataset.from_dict(
        {
            "question": [r[0] for r in rows],
            "choices": [r[1:5] for r in rows],
            "answer": ["ABCD".index(r[5].strip()) for r in rows],
        }
    )


def load_mmlu(test=None, dev=None, **_metadata):
    return datasets.DatasetDict({"test": _read(test), "dev": _read(dev)})
'''


IFEVAL_UTILS = '''"""The harness's own IFEval scoring, re-exported so the local task YAML can
refer to it with `!function utils.<name>` from this directory."""
from lm_eval.tasks.ifeval.utils import agg_inst_level_acc, process_results  # noqa: F401
'''


def write_mmlu(src, out, data, num_fewshot):
    d = os.path.join(out, "mmlu")
    os.makedirs(d, exist_ok=True)
    sdir = os.path.join(src, "mmlu", "default")
    tmpl = load_yaml(os.path.join(sdir, "_default_template_yaml"))
    assert tmpl.get("dataset_path") == "cais/mmlu", tmpl
    new = OrderedDict()
    for k, v in tmpl.items():
        if k == "dataset_path":
            new["dataset_path"] = "csv"
            new["custom_dataset"] = function_tag("utils.load_mmlu")
        else:
            new[k] = v
    if num_fewshot is not None:
        new["num_fewshot"] = int(num_fewshot)
    dump_yaml(dict(new), os.path.join(d, "_default_template_yaml"))
    with open(os.path.join(d, "utils.py"), "w", encoding="utf-8") as f:
        f.write(MMLU_UTILS)

    found, missing = [], []
    for path in sorted(glob.glob(os.path.join(sdir, "mmlu_*.yaml"))):
        cfg = load_yaml(path)
        subject = cfg["dataset_name"]
        test = os.path.join(data, "mmlu", "test", f"{subject}_test.csv")
        dev = os.path.join(data, "mmlu", "dev", f"{subject}_dev.csv")
        if not (os.path.exists(test) and os.path.exists(dev)):
            missing.append(subject)
            continue
        found.append(subject)
        out_cfg = OrderedDict()
        for k, v in cfg.items():
            if k == "dataset_name":
                out_cfg["dataset_kwargs"] = {"test": test, "dev": dev}
            elif k == "task":
                out_cfg["task"] = PREFIX + v
            elif k == "tag":
                out_cfg["tag"] = PREFIX + v
            else:
                out_cfg[k] = v
        dump_yaml(dict(out_cfg), os.path.join(d, os.path.basename(path)))

    for name in ("_mmlu.yaml", "_mmlu_stem.yaml", "_mmlu_other.yaml",
                 "_mmlu_social_sciences.yaml", "_mmlu_humanities.yaml"):
        cfg = load_yaml(os.path.join(sdir, name))
        cfg["group"] = PREFIX + cfg["group"]
        cfg["task"] = [PREFIX + t for t in cfg["task"]]
        dump_yaml(cfg, os.path.join(d, name))
    if missing:
        print(f"mmlu: {len(missing)} subjects have no local data: {', '.join(missing)}",
              file=sys.stderr)
    return found


def write_bbh(src, out, data):
    d = os.path.join(out, "bbh")
    os.makedirs(d, exist_ok=True)
    sdir = os.path.join(src, "bbh", "cot_fewshot")
    tmpl = load_yaml(os.path.join(sdir, "_cot_fewshot_template_yaml"))
    assert tmpl.get("dataset_path") == "SaylorTwift/bbh", tmpl
    tmpl["dataset_path"] = "json"
    dump_yaml(tmpl, os.path.join(d, "_cot_fewshot_template_yaml"))
    found = []
    for path in sorted(glob.glob(os.path.join(sdir, "*.yaml"))):
        if os.path.basename(path).startswith("_"):
            continue
        cfg = load_yaml(path)
        name = cfg["dataset_name"]
        f = os.path.join(data, "bbh", "bbh", f"{name}.json")
        if not os.path.exists(f):
            print(f"bbh: no local data for {name}", file=sys.stderr)
            continue
        found.append(name)
        out_cfg = OrderedDict()
        for k, v in cfg.items():
            if k == "dataset_name":
                out_cfg["dataset_kwargs"] = {"data_files": {"test": f}, "field": "examples"}
            elif k == "task":
                out_cfg["task"] = PREFIX + v
            else:
                out_cfg[k] = v
        dump_yaml(dict(out_cfg), os.path.join(d, os.path.basename(path)))
    grp = load_yaml(os.path.join(sdir, "_bbh_cot_fewshot.yaml"))
    grp["group"] = PREFIX + grp["group"]
    grp["task"] = [PREFIX + t for t in grp["task"] if t[len("bbh_cot_fewshot_"):] in found]
    dump_yaml(grp, os.path.join(d, "_bbh_cot_fewshot.yaml"))
    return found


def local_config(cfg, dataset_kwargs, at, drop=()):
    """The harness task config `cfg` rewritten to read local JSON files: the task name gets
    PREFIX, `dataset_path` becomes "json", `dataset_kwargs` goes in at the key `at` (replacing
    `dataset_name`, or right after `dataset_path`), and the keys in `drop` are left out."""
    out_cfg = OrderedDict()
    for k, v in cfg.items():
        if k in drop:
            continue
        if k == "task":
            out_cfg["task"] = PREFIX + v
        elif k == "dataset_path":
            out_cfg["dataset_path"] = "json"
        elif k != at:
            out_cfg[k] = v
        if k == at:
            out_cfg["dataset_kwargs"] = dataset_kwargs
    return dict(out_cfg)


def write_gsm8k(src, out, data):
    d = os.path.join(out, "gsm8k")
    os.makedirs(d, exist_ok=True)
    cfg = load_yaml(os.path.join(src, "gsm8k", "gsm8k.yaml"))
    assert cfg.get("dataset_path") == "openai/gsm8k", cfg
    files = {
        "train": os.path.join(data, "gsm8k", "train.jsonl"),
        "test": os.path.join(data, "gsm8k", "test.jsonl"),
    }
    # `tag: math_word_problems` would merge with the built-in tag
    out_cfg = local_config(cfg, {"data_files": files}, at="dataset_name", drop=("tag",))
    dump_yaml(out_cfg, os.path.join(d, "gsm8k.yaml"))


def write_ifeval(src, out, data):
    d = os.path.join(out, "ifeval")
    os.makedirs(d, exist_ok=True)
    cfg = load_yaml(os.path.join(src, "ifeval", "ifeval.yaml"))
    assert cfg.get("dataset_path") == "google/IFEval", cfg
    files = {"train": os.path.join(data, "ifeval", "input_data.jsonl")}
    out_cfg = local_config(cfg, {"data_files": files}, at="dataset_path")
    dump_yaml(out_cfg, os.path.join(d, "ifeval.yaml"))
    with open(os.path.join(d, "utils.py"), "w", encoding="utf-8") as f:
        f.write(IFEVAL_UTILS)


def cmd_write_tasks(a):
    src = harness_tasks_dir(a.harness_tasks)
    data = os.path.abspath(a.task_data)
    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    groups = [g for g in a.tasks.split(",") if g]
    for g in groups:
        if g not in GROUPS:
            sys.exit(f"unknown task group {g!r} (expected {','.join(GROUPS)})")
    if "mmlu" in groups:
        found = write_mmlu(src, out, data, a.num_fewshot)
        print(f"mmlu: {len(found)} subjects", file=sys.stderr)
    if "bbh" in groups:
        found = write_bbh(src, out, data)
        print(f"bbh: {len(found)} tasks", file=sys.stderr)
    if "gsm8k" in groups:
        write_gsm8k(src, out, data)
    if "ifeval" in groups:
        write_ifeval(src, out, data)
    print(",".join(HARNESS_TASK_FOR_GROUP[g] for g in groups))


# ----------------------------------------------------------------------------
# verify: the written configs differ from the harness's only where intended
# ----------------------------------------------------------------------------

ALLOWED_DIFF = {"dataset_path", "dataset_name", "dataset_kwargs", "task", "tag",
                "custom_dataset", "group", "num_fewshot"}


def cmd_verify(a):
    src = harness_tasks_dir(a.harness_tasks)
    pairs = []
    for sub, pat in (("mmlu", "mmlu/default/mmlu_*.yaml"),
                     ("bbh", "bbh/cot_fewshot/[!_]*.yaml"),
                     ("gsm8k", "gsm8k/gsm8k.yaml"),
                     ("ifeval", "ifeval/ifeval.yaml")):
        for hp in sorted(glob.glob(os.path.join(src, pat))):
            lp = os.path.join(a.dir, sub, os.path.basename(hp))
            if os.path.exists(lp):
                pairs.append((hp, lp))
    bad = 0
    for hp, lp in pairs:
        h, l = resolve_yaml(hp), resolve_yaml(lp)
        for k in sorted(set(h) | set(l)):
            if k in ALLOWED_DIFF:
                continue
            if h.get(k) != l.get(k) or type(h.get(k)) is not type(l.get(k)):
                bad += 1
                print(f"DIFF {os.path.basename(lp)}: {k}: harness={h.get(k)!r} local={l.get(k)!r}")
        if l.get("task") != PREFIX + h.get("task", ""):
            bad += 1
            print(f"DIFF {os.path.basename(lp)}: task name {l.get('task')!r}")
    print(f"verified {len(pairs)} task configs against {src}: {bad} unexpected differences")
    return 1 if bad else 0


# ----------------------------------------------------------------------------
# fewshot: the harness's gsm8k few-shot choice, replayed
# ----------------------------------------------------------------------------


def cmd_fewshot(a):
    from random import Random

    with open(os.path.join(a.task_data, "gsm8k", "train.jsonl"), encoding="utf-8") as f:
        train = [json.loads(line) for line in f if line.strip()]
    rnd = Random(a.seed)
    idx = list(range(len(train)))
    out = []
    for doc_id in range(a.n):
        # ContextSampler.sample(n, eval_doc=None) == rnd.sample(fewshot_docs, n)
        out.append({"doc_id": doc_id, "train_indices": rnd.sample(idx, a.k)})
    with open(a.out, "w", encoding="utf-8") as f:
        for r in out:
            f.write(json.dumps(r) + "\n")
    print(f"wrote {len(out)} rows to {a.out}", file=sys.stderr)


# ----------------------------------------------------------------------------
# compare
# ----------------------------------------------------------------------------


def norm_task(name):
    return name[len(PREFIX):] if name.startswith(PREFIX) else name


def group_of(task):
    t = norm_task(task)
    if t.startswith("mmlu"):
        return "mmlu"
    if t.startswith("bbh"):
        return "bbh"
    if t.startswith("gsm8k"):
        return "gsm8k"
    if t.startswith("ifeval"):
        return "ifeval"
    return None


def latest(paths):
    return sorted(paths, key=os.path.getmtime)[-1] if paths else None


def find_harness_outputs(d):
    """results json and {task: samples jsonl} of the newest run below d."""
    res = latest(glob.glob(os.path.join(d, "**", "results_*.json"), recursive=True))
    samples = {}
    if res:
        stamp = os.path.basename(res)[len("results_"):-len(".json")]
        for p in glob.glob(os.path.join(os.path.dirname(res), f"samples_*_{stamp}.jsonl")):
            task = os.path.basename(p)[len("samples_"):-len(f"_{stamp}.jsonl")]
            samples[task] = p
    return res, samples


def _ctx(arguments):
    """The context string of a harness sample's first request."""
    if isinstance(arguments, dict):  # {"gen_args_0": {"arg_0": ctx, "arg_1": ...}}
        first = arguments[sorted(arguments, key=lambda k: int(k.rsplit("_", 1)[-1]))[0]]
        return first["arg_0"]
    return arguments[0][0]


def _mc_lls(sample):
    """Per-choice loglikelihoods from a harness multiple-choice sample."""
    fr = sample.get("filtered_resps")
    if fr and isinstance(fr[0], (list, tuple)):
        return [float(x[0]) for x in fr]
    return [float(r[0][0]) for r in sample["resps"]]


def argmax(xs):
    return max(range(len(xs)), key=lambda i: xs[i])


def load_harness_samples(d):
    """{(task, doc_id): record} with record holding prompt, mc or generation data."""
    res_path, files = find_harness_outputs(d)
    results = {}
    if res_path:
        with open(res_path, encoding="utf-8") as f:
            results = json.load(f)
    out = {}
    for task, path in files.items():
        t = norm_task(task)
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                s = json.loads(line)
                key = (t, int(s["doc_id"]))
                rec = out.setdefault(key, {"task": t, "doc_id": key[1], "filtered": {}, "metrics": {}})
                rec["prompt"] = _ctx(s["arguments"])
                filt = s.get("filter", "none")
                for m in s.get("metrics", []):
                    if m in s:
                        rec["metrics"][f"{m},{filt}"] = s[m]
                resps = s.get("resps") or []
                is_mc = bool(resps) and len(resps) > 1 or (
                    resps and isinstance(resps[0], list) and resps[0]
                    and isinstance(resps[0][0], (list, tuple)))
                if is_mc:
                    lls = _mc_lls(s)
                    rec["loglikelihoods"] = lls
                    rec["prediction_index"] = argmax(lls)
                else:
                    rec["output"] = resps[0][0] if resps and resps[0] else ""
                    fr = s.get("filtered_resps")
                    if fr is not None and filt != "none":
                        rec["filtered"][filt] = fr[0] if isinstance(fr, list) and fr else fr
    return results, out


def load_peft(samples_path, json_path, adapter="base"):
    """peft-wit's samples and results; results from --output-path
    (<dir>/harness_layout/<adapter>/results.json, the harness's layout) when
    present, else from --json if that has a `results` table."""
    results, out = {}, {}
    cands = []
    if json_path:
        d = os.path.dirname(json_path)
        cands += [os.path.join(d, "harness_layout", adapter, "results.json")]
        cands += sorted(glob.glob(os.path.join(d, "harness_layout", "**", "results*.json"),
                                  recursive=True))
        cands.append(json_path)
    for c in cands:
        if os.path.exists(c):
            with open(c, encoding="utf-8") as f:
                r = json.load(f)
            if isinstance(r, dict) and "results" in r:
                results = r
                break
    if samples_path and os.path.exists(samples_path):
        with open(samples_path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                s = json.loads(line)
                if s.get("adapter", adapter) != adapter:
                    continue
                t = norm_task(s["task"])
                out[(t, int(s["doc_id"]))] = s
    return results, out


def reported(results, group, metric):
    r = (results or {}).get("results", {})
    for name in (HARNESS_TASK_FOR_GROUP[group], norm_task(HARNESS_TASK_FOR_GROUP[group]), group):
        if name in r and metric in r[name]:
            v = r[name][metric]
            return float(v) if isinstance(v, (int, float)) else None
    return None


def mean(xs):
    xs = [float(x) for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def sample_metric(rec, metric):
    m = rec.get("metrics") or {}
    if metric in m:
        return m[metric]
    base = metric.split(",")[0]
    if metric.endswith(",none") and base in m:
        return m[base]
    return None


def _inst_level(recs, metric):
    # inst-level IFEval metrics are lists of per-instruction booleans per doc
    vals = []
    for r in recs:
        v = sample_metric(r, metric)
        if isinstance(v, list):
            vals.extend(float(x) for x in v)
        elif v is not None:
            vals.append(float(v))
    return mean(vals)


def fmt(x, pct=True):
    if x is None:
        return "-"
    return f"{100 * x:.2f}" if pct else f"{x:.1f}"


def short(s, n=160):
    s = json.dumps(s, ensure_ascii=False)
    return s if len(s) <= n else s[: n - 3] + "..."


def cmd_compare(a):
    rows = []
    disagreements = []
    lines_out = []
    for g in a.tasks.split(","):
        hdir = os.path.join(a.harness_root, g) if a.harness_root else None
        if a.harness_dir_for:
            for spec in a.harness_dir_for:
                k, v = spec.split("=", 1)
                if k == g:
                    hdir = v
        if not hdir or not os.path.isdir(hdir):
            print(f"{g}: no harness run at {hdir}", file=sys.stderr)
            continue
        hres, hs = load_harness_samples(hdir)
        hs = {k: v for k, v in hs.items() if group_of(k[0]) == g}
        pdir = os.path.join(a.peft_root, g) if a.peft_root else None
        pres, ps = load_peft(os.path.join(pdir, "peft_wit_samples.jsonl") if pdir else None,
                             os.path.join(pdir, "peft_wit.json") if pdir else None)
        ps = {k: v for k, v in ps.items() if group_of(k[0]) == g}
        hsec = _read_seconds(os.path.join(hdir, "harness_seconds.txt"))
        psec = _read_seconds(os.path.join(pdir, "peft_wit_seconds.txt")) if pdir else None

        keys = sorted(hs)
        both = [k for k in keys if k in ps]
        only_h = [k for k in keys if k not in ps]
        only_p = sorted(k for k in ps if k not in hs)
        same_pred = same_prompt = 0
        same_filt = defaultdict(lambda: [0, 0])
        max_ll = 0.0
        for k in both:
            h, p = hs[k], ps[k]
            if h.get("prompt") == p.get("prompt"):
                same_prompt += 1
            elif len(disagreements) < 10000:
                disagreements.append((g, k, "prompt", h.get("prompt"), p.get("prompt")))
            if "loglikelihoods" in h:
                pi = p.get("prediction_index")
                if pi == h["prediction_index"]:
                    same_pred += 1
                else:
                    disagreements.append((g, k, "prediction_index",
                                          (h["prediction_index"], h["loglikelihoods"]),
                                          (pi, p.get("loglikelihoods"))))
                pl = p.get("loglikelihoods")
                if isinstance(pl, list) and len(pl) == len(h["loglikelihoods"]):
                    max_ll = max([max_ll] + [abs(x - y) for x, y in zip(h["loglikelihoods"], pl)])
            else:
                if h.get("output") == p.get("output"):
                    same_pred += 1
                else:
                    disagreements.append((g, k, "output", h.get("output"), p.get("output")))
                for fname, hv in h.get("filtered", {}).items():
                    pv = (p.get("filtered") or {}).get(fname)
                    same_filt[fname][1] += 1
                    if pv == hv:
                        same_filt[fname][0] += 1
                    else:
                        disagreements.append((g, k, f"filtered[{fname}]", hv, pv))
        n = len(keys)
        for i, metric in enumerate(GROUP_METRICS[g]):
            hv = reported(hres, g, metric)
            pv = reported(pres, g, metric)
            if hv is None:
                hv = (_inst_level if metric.startswith("inst_") else
                      lambda r, m: mean(sample_metric(x, m) for x in r))(list(hs.values()), metric)
            if pv is None and ps:
                pv = (_inst_level if metric.startswith("inst_") else
                      lambda r, m: mean(sample_metric(x, m) for x in r))(list(ps.values()), metric)
            ratio = (hsec / psec) if (hsec and psec) else None
            rows.append([
                g if i == 0 else "",
                metric,
                str(n) if i == 0 else "",
                (fmt(same_pred / len(both)) if both else "-") if i == 0 else "",
                (fmt(same_prompt / len(both)) if both else "-") if i == 0 else "",
                fmt(hv), fmt(pv),
                fmt(hsec, False) if i == 0 else "", fmt(psec, False) if i == 0 else "",
                (f"{ratio:.2f}x" if ratio else "-") if i == 0 else "",
            ])
        notes = []
        if only_h:
            notes.append(f"{len(only_h)} harness docs missing from peft-wit")
        if only_p:
            notes.append(f"{len(only_p)} peft-wit docs not in harness run")
        if both and any("loglikelihoods" in hs[k] for k in both):
            notes.append(f"max |loglik diff| {max_ll:.2e}")
        for fname, (s, t) in sorted(same_filt.items()):
            notes.append(f"{fname} extracted answers identical {s}/{t}")
        if notes:
            lines_out.append(f"  {g}: " + "; ".join(notes))

    header = ["group", "metric", "n", "%same pred", "%same prompt", "harness",
              "peft-wit", "harness s", "peft-wit s", "speedup"]
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))
    for line in lines_out:
        print(line)
    print("(scores in %, speedup = harness seconds / peft-wit seconds)")
    if disagreements:
        print(f"\n{len(disagreements)} disagreements; first {min(a.show, len(disagreements))}:")
        for g, (t, d), what, hv, pv in disagreements[: a.show]:
            at = ""
            if isinstance(hv, str) and isinstance(pv, str):
                i = next((j for j, (x, y) in enumerate(zip(hv, pv)) if x != y), min(len(hv), len(pv)))
                at = f" (first difference at char {i})"
                lo = max(0, i - 60)
                hv, pv = ("..." if lo else "") + hv[lo:], ("..." if lo else "") + pv[lo:]
            print(f"- {t} doc {d} {what}{at}:\n    harness : {short(hv)}\n    peft-wit: {short(pv)}")
    if a.json_out:
        with open(a.json_out, "w", encoding="utf-8") as f:
            json.dump({"header": header, "rows": rows,
                       "disagreements": [
                           {"task": t, "doc_id": d, "field": w, "harness": hv, "peft_wit": pv}
                           for g, (t, d), w, hv, pv in disagreements]}, f, indent=1)
    return 0


def _read_seconds(p):
    try:
        with open(p) as f:
            return float(f.read().strip())
    except (OSError, ValueError):
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    w = sub.add_parser("write-tasks")
    w.add_argument("--task-data", required=True)
    w.add_argument("--out", required=True)
    w.add_argument("--tasks", default="mmlu,bbh,gsm8k,ifeval")
    w.add_argument("--num-fewshot", type=int, default=None, help="mmlu only")
    w.add_argument("--harness-tasks", default=None,
                   help="lm_eval/tasks dir to copy from (default: the installed lm_eval's)")

    v = sub.add_parser("verify")
    v.add_argument("--dir", required=True)
    v.add_argument("--harness-tasks", default=None)

    fs = sub.add_parser("fewshot")
    fs.add_argument("--task-data", required=True)
    fs.add_argument("--n", type=int, required=True)
    fs.add_argument("--k", type=int, default=5)
    fs.add_argument("--seed", type=int, default=1234)
    fs.add_argument("--out", required=True)

    c = sub.add_parser("compare")
    c.add_argument("--tasks", default="mmlu,bbh,gsm8k,ifeval")
    c.add_argument("--harness-root", help="dir holding <group>/ harness runs")
    c.add_argument("--harness-dir-for", action="append", help="GROUP=DIR override")
    c.add_argument("--peft-root", help="dir holding <group>/peft_wit.json etc.")
    c.add_argument("--show", type=int, default=5)
    c.add_argument("--json-out")

    a = ap.parse_args(argv)
    return {"write-tasks": cmd_write_tasks, "verify": cmd_verify,
            "fewshot": cmd_fewshot, "compare": cmd_compare}[a.cmd](a) or 0


if __name__ == "__main__":
    sys.exit(main())
