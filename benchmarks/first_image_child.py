"""One cold process of ``benchmarks/first_image.py``: ``fewstep sample`` with backend options.

    python -m fewstep.benchmarks.first_image_child SPEC_JSON

SPEC_JSON: ``{"options": {...}, "argv": [...], "steady": N, "head_start": false}``. Runs
``fewstep sample`` with ``argv`` in this process, its ``Pipeline.load`` given
``options`` (backend options, ``prefer``) over those the command passes, and times
inside the process (``head_start``: ``cuda_start.start_context`` first, as the
``fewstep`` entry does): the import
of ``fewstep.runtime``, the rest of ``fewstep sample``'s imports, ``Pipeline.load``, and
the first ``generate`` (the one that makes the image). After the image is written it
times a second ``generate`` and the median of ``steady`` more, on the same pipeline.
The last stdout line is ``RESULT {json}``; the process start time (``time.time()``) is
in it so the parent can tell interpreter start-up apart. The process then ends with
``os._exit`` (no teardown of sessions and CUDA context: nothing measured comes after).

This module imports only the standard library before it starts timing.
"""

import json
import os
import sys
import time

STARTED = time.time()
RESULT_MARK = "RESULT "


def main(spec_text: str) -> int:
    spec = json.loads(spec_text)
    times: dict[str, float] = {}
    if spec.get("head_start"):  # what `fewstep sample` does before it imports
        from fewstep.runtime import cuda_start

        cuda_start.start_context()
    t = time.perf_counter()
    import fewstep.runtime  # noqa: F401

    times["import_runtime_s"] = time.perf_counter() - t
    t = time.perf_counter()
    from fewstep.runtime import cli_sample
    from fewstep.runtime.pipeline import Pipeline

    times["import_sample_s"] = time.perf_counter() - t
    options = dict(spec.get("options") or {})
    real_load = Pipeline.load.__func__  # type: ignore[attr-defined]
    loaded: list[object] = []

    def load(cls: type, path: object = None, backend: str = "auto", **kw: object) -> object:
        t0 = time.perf_counter()
        pipe = real_load(cls, path, backend, **{**kw, **options})  # the lever's win
        times["load_s"] = time.perf_counter() - t0
        real_generate = pipe.generate

        def generate(*args: object, **kwargs: object) -> object:
            t1 = time.perf_counter()
            out = real_generate(*args, **kwargs)
            times.setdefault("first_generate_s", time.perf_counter() - t1)
            return out

        pipe.generate = generate
        loaded.append(pipe)
        return pipe

    Pipeline.load = classmethod(load)  # type: ignore[method-assign, assignment]
    code = cli_sample.main(list(spec["argv"]), prog="fewstep sample")
    times["image_written_at"] = time.time()
    result: dict[str, object] = {"started": STARTED, "exit_code": code, **times}
    if code == 0 and loaded:
        pipe: object = loaded[0]
        steps = int(spec.get("steps", 4))
        result["first_path"] = getattr(pipe, "last_path", None)
        t = time.perf_counter()
        pipe.generate(1, steps, seed=1)  # type: ignore[attr-defined]
        result["second_generate_s"] = time.perf_counter() - t
        steady = []
        for i in range(int(spec.get("steady", 0))):
            t = time.perf_counter()
            pipe.generate(1, steps, seed=2 + i % 4)  # type: ignore[attr-defined]
            steady.append(time.perf_counter() - t)
        if steady:
            result["steady_s"] = sorted(steady)[len(steady) // 2]
        result["path"] = getattr(pipe, "last_path", None)
        result["graphs"] = [
            {"path": g["path"].rsplit("/", 1)[-1], **{k: g["runtime"].get(k) for k in (
                "optimized_cache", "cuda_graph", "graph_optimization_level")}}
            for g in pipe.describe()["graphs"] if "runtime" in g]  # type: ignore[attr-defined]
    print(RESULT_MARK + json.dumps(result), flush=True)
    return int(code)


if __name__ == "__main__":
    status = main(sys.argv[1])
    sys.stderr.flush()
    os._exit(status)  # no interpreter teardown: it is not part of what is measured
