"""lm-evaluation-harness on local task files: ``edkm eval MODEL --harness lm-eval``.

lm-eval (``lm_eval``, pinned in requirements.txt) runs its ``hf`` model on a Hugging Face
directory (or a hub name, for users who have the hub). An edkm file is first exported to a
temporary directory (:func:`edkm.export_hf`, in float32 so the weights are exactly the file's).

The tasks are our jsonl files, read through the task configs in ``edkm/lm_eval_tasks/``
(``dataset_path: json``); the data file of each is filled in at run time from the data folder,
so nothing is fetched from the hub. Their conventions are the ones of :mod:`edkm.evaluate`:
zero-shot, the continuation after the query with a space (PIQA's queries end with a newline,
so no space there), ``acc`` / ``acc_norm`` (lm-eval normalizes by characters, ours by UTF-8
bytes: the same on ASCII text).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Dict, Iterable, Optional

TASKS_DIR = Path(__file__).parent / "lm_eval_tasks"
TASK_PREFIX = "edkm_"


def available_tasks() -> list:
    return sorted(p.stem[len(TASK_PREFIX) :] for p in TASKS_DIR.glob(f"{TASK_PREFIX}*.yaml"))


def write_task_configs(tasks: Iterable[str], data_dir, out_dir: str) -> list:
    """Copy the task configs for ``tasks`` into ``out_dir`` with their data file set to
    DATA/eval/NAME.jsonl; returns lm-eval's task names."""
    from edkm.evaluate import resolve_task

    names = []
    for task in tasks:
        src = TASKS_DIR / f"{TASK_PREFIX}{task}.yaml"
        if not src.is_file():
            raise ValueError(
                f"edkm eval --harness lm-eval: no local task config for {task!r}; available: {available_tasks()}"
            )
        _, path = resolve_task(task, data_dir)
        text = src.read_text().replace("DATA_FILE", str(Path(path).resolve()))
        (Path(out_dir) / src.name).write_text(text)
        names.append(src.stem)
    return names


def run(
    model: str,
    tasks: Iterable[str],
    data_dir=None,
    *,
    limit: Optional[int] = None,
    batch_size: int = 8,
    dtype: str = "float32",
    device: str = "cpu",
    log_samples: bool = False,
) -> Dict:
    """lm-eval's ``simple_evaluate`` with the ``hf`` model on ``model`` (a Hugging Face
    directory, a hub name, or an edkm file, exported first). Tasks with a config here
    (:func:`available_tasks`) read DATA/eval/NAME.jsonl; any other name goes to lm-eval's own
    registry (which downloads its data). Returns {"tasks": {name: {metric: value, "n"}},
    "settings", "samples"?}."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = list(tasks)
    if "ppl" in tasks:
        raise ValueError("edkm eval --harness lm-eval: 'ppl' is edkm's own perplexity task; run it without --harness")
    local = [t for t in tasks if t in available_tasks()]
    hub = [t for t in tasks if t not in local]  # lm-eval's own registry (needs its datasets' hub)
    if not hub:
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="edkm-lm-eval-") as tmp:
        pretrained = model
        if os.path.isfile(model) and model.endswith(".safetensors"):
            from edkm.hf_export import export_hf

            pretrained = export_hf(model, os.path.join(tmp, "model"), dtype="float32")
        cfg_dir = os.path.join(tmp, "tasks")
        os.makedirs(cfg_dir)
        local_names = dict(zip(local, write_task_configs(local, data_dir, cfg_dir)))
        names = [local_names.get(t, t) for t in tasks]
        out = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": pretrained, "dtype": dtype, "device": device},
            tasks=names,
            task_manager=TaskManager(include_path=cfg_dir, include_defaults=bool(hub)),
            limit=limit,
            batch_size=batch_size,
            log_samples=log_samples,
            bootstrap_iters=100,
        )  # acc: closed form
    result: Dict = {
        "tasks": {},
        "settings": {
            "harness": f"lm-eval {lm_eval.__version__}" if hasattr(lm_eval, "__version__") else "lm-eval",
            "limit": limit,
            "batch_size": batch_size,
            "dtype": dtype,
        },
    }
    for task, name in zip(tasks, names):
        r = out["results"][name]
        result["tasks"][task] = {
            k.replace(",none", ""): v for k, v in r.items() if k != "alias" and isinstance(v, (int, float))
        }
        result["tasks"][task]["n"] = out["n-samples"][name]["effective"]
    if log_samples:
        result["samples"] = {
            task: sorted(out["samples"][name], key=lambda s: s["doc_id"]) for task, name in zip(tasks, names)
        }
    return result
