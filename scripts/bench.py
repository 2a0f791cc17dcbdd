"""Speed and memory of distillation as ratios, measured side by side in one run (a benchmark, not a test).

    python scripts/bench.py --json results/bench/bench.json --profile    # `make bench`; wall time: see the README

Each ratio compares two set-ups A / B of the same run, interleaved A B A B ...: every round builds a fresh
DistillationTrainer per set-up and trains a few optimizer steps; per-step wall times are the gaps between consecutive
``on_step_end`` callbacks (data loading, cache reads, forward, backward and the optimizer step all count; the first
step of a round has no gap). The ratio is the median over rounds of median(A) / median(B) within the round, so load
that drifts between rounds cancels; the load average is recorded. The same ratio in process CPU time is recorded next
to it: other processes' load inflates wall time, hardly CPU time (1 torch thread, no DataLoader workers). Models have random weights (speed does not depend on
them), data is in memory (the demo's digits, random 64 px images) or written here (the CLIP smoke recipe's shapes).

Set-ups (targets from issue 13):

* CIFD (3 RDMs + IBM) / KD, live teacher: timm ResNet34 -> ResNet18 (<= 1.05); the CLIP smoke recipe's tiny
  open_clip ViT pair, against open_clip's own distillation loss, the CLIP counterpart of KD (<= 1.05); the demo's
  tiny CNNs with its RDMs and batch size 32 (<= 1.2), live and from the teacher cache (the demo's setting; RDM
  outputs cached as well).
* KD from the teacher-output cache / the student alone (CE): ResNet18 and the tiny CNN (<= 1.10).
* RDM stage (``train_rdms``, ResNet34 teacher at 224 px, the paper's 512-wide RDMs): live teacher / cache per step
  (>= 30x) and 3 RDMs / 1 RDM in one teacher pass (<= 1.2; from the cache too, for information).
* Peak memory CIFD / KD (ResNet34 -> ResNet18, live teacher): peak RSS above the post-import RSS of a child process
  per set-up, children run A B A B (2 rounds), medians (<= 1.10).

``--profile`` adds torch.profiler's top operations (self CPU time) of CIFD and KD on the tiny CNNs (cache) to the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

RATES = [1e4, 5e3, 1e3]


# ----------------------------------------------------------------------------------------------- timing machinery
def _clock():
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.ends: list[float] = []
            self.cpu_ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())
            self.cpu_ends.append(time.process_time())

    return StepClock()


def _config(output_dir, method, steps, batch_size, **kw):
    from hf_cifd import DistillationConfig

    return DistillationConfig(output_dir=output_dir, method=method, max_steps=steps, per_device_train_batch_size=batch_size,
                              per_device_eval_batch_size=256, learning_rate=kw.pop("learning_rate", 1e-3),
                              report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no", eval_strategy="no",
                              disable_tqdm=True, dataloader_num_workers=0, seed=0, **kw)


def _gaps(ends: list[float]) -> list[float]:
    return [b - a for a, b in zip(ends[:-1], ends[1:])]


def _step_times(make, steps) -> tuple[list[float], list[float]]:
    """Wall and process-CPU seconds of each step (after the first) of a fresh trainer."""
    from transformers.trainer_callback import PrinterCallback

    clock = _clock()
    trainer = make(steps, clock)
    trainer.remove_callback(PrinterCallback)  # its end-of-training metrics line, per round
    trainer.train()
    return _gaps(clock.ends), _gaps(clock.cpu_ends)


def interleaved(makers: dict, steps: int, rounds: int, log) -> tuple[dict, dict]:
    """Per-step wall and CPU times of each set-up, per round; rounds run A B A B ..."""
    times: dict[str, list[list[float]]] = {k: [] for k in makers}
    cpu: dict[str, list[list[float]]] = {k: [] for k in makers}
    for r in range(rounds):
        for name, make in makers.items():
            wall, used = _step_times(make, steps)
            times[name].append(wall)
            cpu[name].append(used)
        log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {1e3 * statistics.median(v[-1]):.1f} ms"
                                                      for k, v in times.items()))
    return times, cpu


def _round_ratios(values, a, b) -> list[float]:
    return [statistics.median(ra) / statistics.median(rb) for ra, rb in zip(values[a], values[b])]


def ratio_row(name, a, b, values, target, kind="<=", note="", unit="ms/step", cpu=None):
    """``values[x]``: per round, the samples of set-up x (seconds per step, or MiB). The ratio is the median over
    rounds of median(A) / median(B) in that round (A and B ran back to back, under the same load); the medians shown
    are over all samples. ``cpu``: the same in process CPU seconds (what other processes' load does not inflate)."""
    ratios = _round_ratios(values, a, b)
    pooled_a = [x for r in values[a] for x in r]
    pooled_b = [x for r in values[b] for x in r]
    r = statistics.median(ratios)
    met = r <= target if kind == "<=" else r >= target
    scale = 1e3 if unit == "ms/step" else 1.0
    return {"name": name, "a": a, "b": b, "median_a": round(scale * statistics.median(pooled_a), 3),
            "median_b": round(scale * statistics.median(pooled_b), 3), "unit": unit, "rounds": len(ratios),
            "samples_a": len(pooled_a), "samples_b": len(pooled_b), "ratio": round(r, 3),
            "round_ratios": [round(x, 3) for x in ratios], "target": f"{kind} {target}", "met": met, "note": note,
            "cpu_ratio": round(statistics.median(_round_ratios(cpu, a, b)), 3) if cpu else None}


# ----------------------------------------------------------------------------------------------- set-ups
def tiny_setup(tmp):
    """The demo's teacher/student (hf_cifd/demo.py) on its digits split; teacher cache as the demo builds it."""
    from hf_cifd.data import cache_teacher_outputs
    from hf_cifd.demo import RDM_RATES as TINY_RATES, load_digits_splits, student_model, teacher_model
    from hf_cifd.modules import RateDistortionModule

    train, _ = load_digits_splits()
    torch.manual_seed(0)
    teacher = teacher_model().eval()
    cache = os.path.join(tmp, "tiny_cache")
    cache_teacher_outputs(teacher, train, cache, dtype="float32", shard_size=512, progress=False)
    rdms = [RateDistortionModule(teacher.embed_dim, hidden_dims=(128, 64, 128), num_classes=10, rate_weight=r)
            for r in TINY_RATES]  # the demo's RDMs (hf_cifd/demo.py)

    def make(method, live, **kw):
        def build(steps, clock):
            from hf_cifd import DistillationTrainer

            extra = dict(num_rdms=3, rdm_rates=list(TINY_RATES)) if method == "cifd" else {}
            return DistillationTrainer(
                model=student_model(), teacher=teacher if live and method != "student" else None, train_dataset=train,
                teacher_cache=None if live or method == "student" else cache, rdms=rdms if method == "cifd" else None,
                args=_config(os.path.join(tmp, "tiny"), method, steps, 32, learning_rate=3e-3, weight_decay=1e-4,
                             **extra, **kw),
                callbacks=[clock])
        return build

    return make


def resnet_data(n=128, size=64, num_classes=10):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, size, size, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    return [{"pixel_values": x[i], "labels": y[i], "sample_key": f"img-{i}"} for i in range(n)]


def resnet_models(num_classes=10):
    import timm

    torch.manual_seed(0)
    return timm.create_model("resnet34", num_classes=num_classes).eval(), timm.create_model("resnet18", num_classes=num_classes)


def resnet_setup(tmp, batch_size, with_cache=True):
    from hf_cifd.data import cache_teacher_outputs
    from hf_cifd.modules import RateDistortionModule

    data = resnet_data()
    teacher, _ = resnet_models()
    cache = os.path.join(tmp, "resnet_cache") if with_cache else None
    if with_cache:
        cache_teacher_outputs(teacher, data, cache, dtype="float16", batch_size=32, progress=False)
    # The paper's ImageNet RDM (Appendix A.2): 3 hidden layers of 512, bottleneck after the 2nd.
    rdms = [RateDistortionModule(512, num_classes=10, rate_weight=r) for r in RATES]

    def make(method, live):
        def build(steps, clock):
            from hf_cifd import DistillationTrainer

            _, student = resnet_models()
            extra = dict(num_rdms=3, rdm_rates=RATES) if method == "cifd" else {}
            return DistillationTrainer(
                model=student, teacher=teacher if live and method != "student" else None, train_dataset=data,
                teacher_cache=None if live or method == "student" else cache, rdms=rdms if method == "cifd" else None,
                args=_config(os.path.join(tmp, "resnet"), method, steps, batch_size, **extra), callbacks=[clock])
        return build

    return make, data, teacher, cache


def clip_setup(tmp):
    """The tiny open_clip teacher/student configs of the CLIP smoke recipe, on its generated shapes data."""
    import glob

    from hf_cifd import clip_pipeline as recipe
    from hf_cifd.adapters.open_clip import create_openclip
    from hf_cifd.data import collate, load_image_dataset, shapes
    from hf_cifd.modules import RateDistortionModule

    torch.manual_seed(0)
    teacher, _, t_pre, t_tok = create_openclip(recipe.SMOKE_TEACHER, preprocess_cfg=recipe.SMOKE_TEACHER_PP)
    teacher.eval()
    shapes.write_webdataset(os.path.join(tmp, "shapes"), 1024, seed=1, shard_size=256)
    files = {"train": sorted(glob.glob(os.path.join(tmp, "shapes", "*.tar")))}
    smoke = recipe.SMOKE_DEFAULTS
    dim = recipe.SMOKE_TEACHER["embed_dim"]
    rdms = {m: [RateDistortionModule(dim, hidden_dims=smoke["rdm_hidden_dims"], rate_weight=r) for r in smoke["rdm_rates"]]
            for m in ("image", "text")}  # the recipe's --smoke RDMs

    def make(method):
        def build(steps, clock):
            from hf_cifd import DistillationTrainer

            torch.manual_seed(0)
            student, _, s_pre, s_tok = create_openclip(recipe.SMOKE_STUDENT, preprocess_cfg=recipe.SMOKE_STUDENT_PP)
            ds = load_image_dataset("webdataset", task="image-text", data_files=files, streaming=True, transform=s_pre,
                                    tokenizer=s_tok, teacher_transform=t_pre, teacher_tokenizer=t_tok, shuffle_buffer=256)
            extra = dict(num_rdms=3, rdm_rates=smoke["rdm_rates"]) if method == "cifd" else {}
            return DistillationTrainer(
                student, teacher, train_dataset=ds, rdms=rdms if method == "cifd" else None, data_collator=collate,
                args=_config(os.path.join(tmp, "clip"), method, steps, smoke["per_device_train_batch_size"],
                             learning_rate=smoke["learning_rate"], lambda_ibm=smoke["lambda_ibm"], **extra),
                callbacks=[clock])
        return build

    return make


# ----------------------------------------------------------------------------------------------- RDM stage
def rdm_step_times(data, teacher, cache, n_rdms, live, steps, batch_size) -> tuple[list[float], list[float]]:
    """Per-step wall and CPU times of ``train_rdms``: its collate function runs once per step (no DataLoader workers),
    so consecutive calls are one step apart; the first step and the one before the final evaluation are dropped."""
    from hf_cifd import train_rdms
    from hf_cifd.data import collate

    stamps: list[float] = []
    cpu: list[float] = []

    def clocked(samples):
        stamps.append(time.perf_counter())
        cpu.append(time.process_time())
        return collate(samples)

    report = train_rdms(data, teacher=teacher if live else None, teacher_cache=None if live else cache,
                        rates=RATES[:n_rdms], max_steps=steps, batch_size=batch_size, eval_dataset=data[:batch_size],
                        collate_fn=clocked, progress=False)
    assert report.steps == steps
    return _gaps(stamps[1:steps + 1]), _gaps(cpu[1:steps + 1])


# ----------------------------------------------------------------------------------------------- memory (child)
def _rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


def memory_child(method: str, steps: int, batch_size: int) -> None:
    import transformers  # noqa: F401  (imports are not the run's memory)
    from hf_cifd import DistillationTrainer  # noqa: F401
    import timm  # noqa: F401

    base = _rss_kb()
    with tempfile.TemporaryDirectory() as tmp:
        make, *_ = resnet_setup(tmp, batch_size, with_cache=False)
        make(method, True)(steps, _clock()).train()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"base_kb": base, "peak_kb": peak}))


def peak_memory(methods, rounds, steps, batch_size, threads, log) -> dict[str, list[list[float]]]:
    out: dict[str, list[list[float]]] = {m: [] for m in methods}
    for r in range(rounds):
        for m in methods:
            res = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", m, "--steps", str(steps),
                                  "--batch-size", str(batch_size), "--threads", str(threads)],
                                 capture_output=True, text=True, timeout=600)
            if res.returncode != 0:
                raise RuntimeError(res.stderr[-3000:])
            row = json.loads(res.stdout.strip().splitlines()[-1])
            out[m].append([(row["peak_kb"] - row["base_kb"]) / 1024])
        log(f"  round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1][0]:.0f} MiB" for k, v in out.items()))
    return out


# ----------------------------------------------------------------------------------------------- profile
def profile_tiny(make_tiny, steps, top=12) -> dict:
    """torch.profiler over ``steps`` training steps of CIFD and KD on the tiny CNNs (teacher cache): the top operations
    by self CPU time and the number of recorded operations, per step (trainer set-up included, amortised)."""
    from torch.profiler import ProfilerActivity, profile
    from transformers.trainer_callback import PrinterCallback

    out = {}
    for method in ("cifd", "kd"):
        trainer = make_tiny(method, live=False)(steps, _clock())
        trainer.remove_callback(PrinterCallback)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            trainer.train()
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        out[method] = {"ops_per_step": round(sum(e.count for e in events) / steps),
                       "self_cpu_ms_per_step": round(sum(e.self_cpu_time_total for e in events) / 1e3 / steps, 3),
                       "top": [{"op": e.key, "self_cpu_ms_per_step": round(e.self_cpu_time_total / 1e3 / steps, 3),
                                "calls_per_step": round(e.count / steps, 1)} for e in events[:top]]}
    return out


# ----------------------------------------------------------------------------------------------- main
def format_table(rows) -> str:
    lines = ["| measurement (A / B) | median A / B | ratio (rounds) | CPU-time ratio | target | met |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        unit = "ms" if r["unit"] == "ms/step" else r["unit"]
        cpu = "" if r["cpu_ratio"] is None else f"{r['cpu_ratio']:.2f}"
        lines.append(f"| {r['name']} | {r['median_a']:.1f} / {r['median_b']:.1f} {unit} | **{r['ratio']:.2f}** "
                     f"({min(r['round_ratios']):.2f}-{max(r['round_ratios']):.2f}) | {cpu} | {r['target']} | "
                     f"{'yes' if r['met'] else 'no'} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default="bench.json", help="where the results go")
    p.add_argument("--rounds", type=int, default=3, help="A B rounds per ratio (the tiny CNNs run 2x as many)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: least sensitive to other load)")
    p.add_argument("--profile", action="store_true", help="add torch.profiler's top ops of CIFD and KD (tiny CNNs)")
    p.add_argument("--only", default="tiny,resnet,clip,rdm,memory", help="comma-separated sections")
    p.add_argument("--rdm-size", type=int, default=224, help="image size of the RDM stage (ResNet34's native 224)")
    p.add_argument("--memory-child", help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=6, help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=16, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.memory_child:
        return memory_child(a.memory_child, a.steps, a.batch_size)

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    sections = set(a.only.split(","))
    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:6.0f}s] {msg}", flush=True)

    rows, raw, raw_cpu, extra = [], {}, {}, {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        if "tiny" in sections:
            log("tiny CNNs (demo teacher/student and RDMs, digits, batch 32)")
            make = tiny_setup(tmp)
            t, c = interleaved({"cifd_cache": make("cifd", live=False), "kd_cache": make("kd", live=False),
                                "cifd_live": make("cifd", live=True), "kd_live": make("kd", live=True),
                                "student": make("student", live=True)}, steps=20, rounds=3 * a.rounds, log=log)
            raw["tiny"], raw_cpu["tiny"] = t, c
            rows += [ratio_row("tiny CNNs, CIFD / KD, teacher cache (the demo)", "cifd_cache", "kd_cache", t, 1.2,
                               note="RDM outputs cached with the teacher outputs", cpu=c),
                     ratio_row("tiny CNNs, CIFD / KD, live teacher", "cifd_live", "kd_live", t, 1.2, cpu=c),
                     ratio_row("tiny CNNs, KD from cache / student alone", "kd_cache", "student", t, 1.10, cpu=c)]
            if a.profile:
                extra["profile_tiny_cache"] = profile_tiny(make, 60)
        if "resnet" in sections:
            make, *_ = resnet_setup(tmp, batch_size=16)
            log("timm ResNet34 -> ResNet18 (random weights, 64 px, batch 16)")
            t, c = interleaved({"cifd_live": make("cifd", True), "kd_live": make("kd", True),
                                "kd_cache": make("kd", False), "student": make("student", True)},
                               steps=4, rounds=2 * a.rounds, log=log)
            raw["resnet"], raw_cpu["resnet"] = t, c
            rows += [ratio_row("ResNet34 -> ResNet18, CIFD / KD, live teacher", "cifd_live", "kd_live", t, 1.05, cpu=c),
                     ratio_row("ResNet18, KD from cache / student alone", "kd_cache", "student", t, 1.10, cpu=c)]
        if "clip" in sections:
            log("CLIP smoke recipe's tiny open_clip ViT pair (batch 64, streamed shapes data)")
            mk = clip_setup(tmp)
            t, c = interleaved({"cifd": mk("cifd"), "openclip": mk("openclip")}, steps=8, rounds=2 * a.rounds, log=log)
            raw["clip"], raw_cpu["clip"] = t, c
            rows.append(ratio_row("CLIP ViT pair, CIFD / open_clip distillation, live teacher", "cifd", "openclip", t,
                                  1.05, note="3 RDMs + IBM per modality", cpu=c))
        if "rdm" in sections:
            log(f"RDM stage (train_rdms, ResNet34 teacher, {a.rdm_size} px, batch 32, RDMs of the paper's ImageNet size)")
            from hf_cifd.data import cache_teacher_outputs

            data = resnet_data(n=96, size=a.rdm_size)
            teacher, _ = resnet_models()
            cache = os.path.join(tmp, "rdm_cache")
            cache_teacher_outputs(teacher, data, cache, dtype="float16", batch_size=32, progress=False)
            t = {"live_3": [], "cache_3": [], "live_1": [], "cache_1": []}
            c = {k: [] for k in t}
            for r in range(a.rounds):
                for name in t:
                    live, n = name.startswith("live"), int(name[-1])
                    wall, used = rdm_step_times(data, teacher, cache, n, live, steps=4 if live else 20, batch_size=32)
                    t[name].append(wall)
                    c[name].append(used)
                log(f"  round {r + 1}/{a.rounds}: " + ", ".join(f"{k} {1e3 * statistics.median(v[-1]):.1f} ms/step"
                                                              for k, v in t.items()))
            raw["rdm"], raw_cpu["rdm"] = t, c
            note = f"per optimizer step at {a.rdm_size} px, set-up and the final evaluation excluded"
            rows += [ratio_row("RDM stage, live teacher / teacher cache (speed-up)", "live_3", "cache_3", t, 30, ">=", note,
                               cpu=c),
                     ratio_row("RDM stage, 3 RDMs / 1 RDM in one pass, live teacher", "live_3", "live_1", t, 1.2, cpu=c),
                     ratio_row("RDM stage, 3 RDMs / 1 RDM, teacher cache (info)", "cache_3", "cache_1", t, 1.2,
                               note="no teacher cost left to share", cpu=c)]
        if "memory" in sections:
            log("peak memory, ResNet34 -> ResNet18, live teacher (child processes)")
            t = peak_memory(["cifd", "kd"], 2, steps=3, batch_size=16, threads=a.threads, log=log)
            raw["memory_mib"] = t
            rows.append(ratio_row("ResNet34 -> ResNet18, peak memory CIFD / KD, live teacher", "cifd", "kd", t, 1.10,
                                  note="peak RSS above the post-import RSS of a child process", unit="MiB"))
    result = {"rows": rows, "raw_seconds": raw, "raw_cpu_seconds": raw_cpu, **extra,
              "machine": {"cpus": os.cpu_count(), "torch_threads": a.threads, "torch": torch.__version__,
                          "python": platform.python_version(), "loadavg_start": load_before,
                          "loadavg_end": os.getloadavg()},
              "command": "python scripts/bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "wall_seconds": round(time.perf_counter() - t_start, 1)}
    with open(a.json, "w") as f:
        json.dump(result, f, indent=2)
    print(format_table(rows))
    print(f"load average {load_before[0]:.1f} -> {os.getloadavg()[0]:.1f}; {result['wall_seconds']} s; results: {a.json}")


if __name__ == "__main__":
    main()
