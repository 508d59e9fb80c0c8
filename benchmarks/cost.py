"""Tool cost: what the ``convfuse`` command costs as a CI step, and how that grows with model size.

Each measurement runs in a fresh subprocess (through a small wrapper that reports the child's
wall time and peak resident memory, ``getrusage(RUSAGE_CHILDREN).ru_maxrss``):

* CLI       ``python -m convfuse IN -o OUT --report r.json --input-shape ... -q``: the whole
            command (Python start, imports, load, trace, fuse, verify, save), as a CI step runs it.
            Its phases come from the JSON report's ``timings``: load, reference (the original's
            outputs, including the float64 run verification needs), trace, fold (matching, checks
            and folding), verify (the fused model's forward passes and comparison), save.
* baseline  a subprocess that imports torch and torchvision, loads the same file with
            ``torch.load`` and runs one forward pass on the same input: what any use of the model
            costs anyway. "overhead" = CLI - baseline.

Models: a saved resnet50 (torchvision, weights=None, BN statistics randomised, whole pickled
module) and deep synthetic models, ``nn.Sequential`` of N (Conv2d(16, 16, 3, padding=1),
BatchNorm2d(16), ReLU) blocks on a 1x16x32x32 input, to show that cost grows linearly with the
number of layers: the per-block columns should stay flat as N grows.

DESIGN.md targets: trace + fold together cost less than one forward pass (column "trace+fold /
fwd"); peak memory at most about 1.2x the model's size plus activations ("extra RSS" = CLI peak
RSS - baseline peak RSS, which already holds the model once and the activations).

Exit status: 1 when the CLI fails (a wrong output would fail its verification: exit 1), else 0.

    python benchmarks/cost.py [--quick] [--repeat 3] [--output FILE.md]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from _common import REPO, deep_model, emit, header, markdown_table, randomize_bn

warnings.filterwarnings("ignore")

DEPTHS = [50, 200, 800]
QUICK_DEPTHS = [25, 100]
PHASES = ["load", "trace", "reference", "fold", "verify", "save"]  # the report's timings, in this order

# Runs CMD in a child process; prints its wall time and peak RSS (KiB on Linux) as JSON.
_WRAPPER = textwrap.dedent(
    """
    import json, resource, subprocess, sys, time
    start = time.perf_counter()
    done = subprocess.run(sys.argv[1:], capture_output=True, text=True)
    wall = time.perf_counter() - start
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"wall": wall, "rss_kib": rss, "rc": done.returncode,
                      "stdout": done.stdout[-4000:], "stderr": done.stderr[-4000:]}))
    """
)

# The baseline: what using the model costs anyway (Python, imports, load, one forward).
_BASELINE = textwrap.dedent(
    """
    import json, sys, time
    start = time.perf_counter()
    import torch, torchvision
    torch.set_num_threads(int(sys.argv[3]))
    imported = time.perf_counter()
    model = torch.load(sys.argv[1], weights_only=False).eval()
    loaded = time.perf_counter()
    shape = tuple(int(d) for d in sys.argv[2].split(","))
    x = torch.randn(shape)
    with torch.no_grad():
        model(x)
        first = time.perf_counter()
        model(x)
    second = time.perf_counter()
    print(json.dumps({"import": imported - start, "load": loaded - imported,
                      "first_forward": first - loaded, "forward": second - first}))
    """
)

# What convfuse's own imports (the CLI's: typer, rich, convfuse) add on top of torch + torchvision.
_IMPORTS = textwrap.dedent(
    """
    import json, time
    def rss_mb():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    import torch, torchvision
    before, start = rss_mb(), time.perf_counter()
    import convfuse.cli, convfuse.api, convfuse.files
    print(json.dumps({"seconds": time.perf_counter() - start, "mb": rss_mb() - before}))
    """
)


def import_cost(repeat: int, env: dict[str, str]) -> tuple[float, float]:
    """Median (seconds, MB) that importing convfuse adds to a process that has torch and torchvision."""
    runs = []
    for _ in range(repeat):
        done = subprocess.run(
            [sys.executable, "-c", _IMPORTS], capture_output=True, text=True, env=env, check=True
        )
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return statistics.median(r["seconds"] for r in runs), statistics.median(r["mb"] for r in runs)


@dataclass
class Run:
    wall: float
    rss_mb: float
    rc: int
    stdout: str
    stderr: str


def measured(cmd: list[str], env: dict[str, str]) -> Run:
    """Run ``cmd`` in a fresh process; its wall time and peak RSS."""
    done = subprocess.run(
        [sys.executable, "-c", _WRAPPER, *cmd], capture_output=True, text=True, env=env, check=True
    )
    data = json.loads(done.stdout)
    return Run(data["wall"], data["rss_kib"] / 1024, data["rc"], data["stdout"], data["stderr"])


@dataclass
class Case:
    name: str
    path: Path
    shape: str
    size_mb: float
    norms: int
    blocks: int | None = None
    cli: list[Run] = field(default_factory=list)
    baseline: list[Run] = field(default_factory=list)
    reports: list[dict] = field(default_factory=list)
    baseline_info: list[dict] = field(default_factory=list)

    def med(self, values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    @property
    def cli_wall(self) -> float:
        return self.med([r.wall for r in self.cli])

    @property
    def cli_rss(self) -> float:
        return self.med([r.rss_mb for r in self.cli])

    @property
    def base_wall(self) -> float:
        return self.med([r.wall for r in self.baseline])

    @property
    def base_rss(self) -> float:
        return self.med([r.rss_mb for r in self.baseline])

    def phase(self, name: str) -> float:
        return self.med([r["timings"].get(name, 0.0) for r in self.reports])

    @property
    def forward(self) -> float:
        return self.med([b["forward"] for b in self.baseline_info])

    @property
    def ok(self) -> bool:
        return all(r.rc == 0 for r in self.cli) and bool(self.cli)


def _file_mb(path: Path) -> float:
    return path.stat().st_size / 2**20


def prepare(workdir: Path, depths: list[int], with_resnet: bool) -> list[Case]:
    import torchvision

    cases = []
    if with_resnet:
        torch.manual_seed(0)
        model = randomize_bn(torchvision.models.resnet50(weights=None), 0).eval()
        path = workdir / "resnet50.pt"
        torch.save(model, path)
        cases.append(Case("resnet50", path, "1,3,224,224", _file_mb(path), 53))
    for n in depths:
        path = workdir / f"deep{n}.pt"
        torch.save(deep_model(n), path)
        cases.append(Case(f"deep {n} blocks", path, "1,16,32,32", _file_mb(path), n, blocks=n))
    return cases


def subprocess_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH", "")]))
    env["OMP_NUM_THREADS"] = str(threads)  # the CLI has no thread option; torch reads this at start
    env.setdefault("NO_COLOR", "1")
    return env


def measure(case: Case, workdir: Path, repeat: int, threads: int) -> None:
    env = subprocess_env(threads)
    out, report = workdir / f"{case.path.stem}.fused.pt", workdir / f"{case.path.stem}.json"
    for _ in range(repeat):  # alternate, so both see the same machine state
        base = measured([sys.executable, "-c", _BASELINE, str(case.path), case.shape, str(threads)], env)
        case.baseline.append(base)
        if base.rc == 0:
            case.baseline_info.append(json.loads(base.stdout.strip().splitlines()[-1]))
        cli = measured(
            [
                sys.executable,
                "-m",
                "convfuse",
                str(case.path),
                "-o",
                str(out),
                "--report",
                str(report),
                "--input-shape",
                case.shape,
                "-q",
            ],
            env,
        )
        case.cli.append(cli)
        if cli.rc == 0:
            case.reports.append(json.loads(report.read_text()))
        else:
            print(f"{case.name}: convfuse exited {cli.rc}: {cli.stderr.strip()[-500:]}", file=sys.stderr)


def _s(value: float) -> str:
    return f"{value:.2f}"


def _phases(cases: list[Case]) -> list[str]:
    seen = {name for c in cases for r in c.reports for name in r.get("timings", {})}
    return [p for p in PHASES if p in seen] + sorted(seen - set(PHASES))


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """Least-squares ``y = a + b x``: (a, b, largest |residual| / y)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    a = my - b * mx
    worst = max((abs(y - (a + b * x)) / abs(y) for x, y in zip(xs, ys) if y), default=0.0)
    return a, b, worst


def render(cases: list[Case], imports: tuple[float, float]) -> str:
    import_s, import_mb = imports
    phases = _phases(cases)
    columns = [
        "model", "size MB", "BN", "exit", "CLI wall s", "baseline wall s", "overhead s", "CLI peak RSS MB",
        "baseline RSS MB", "extra RSS MB", "(extra - imports) / size", *[f"{p} s" for p in phases],
        "1 fwd s", "trace+fold / fwd",
    ]  # fmt: skip
    rows = []
    for c in cases:
        extra = c.cli_rss - c.base_rss
        core = c.phase("trace") + c.phase("fold")
        fused = c.reports[0]["norm_layers"] if c.reports else None
        rows.append([
            c.name, f"{c.size_mb:.1f}", f"{fused['before']}->{fused['after']}" if fused else str(c.norms),
            ",".join(sorted({str(r.rc) for r in c.cli})), _s(c.cli_wall), _s(c.base_wall),
            _s(c.cli_wall - c.base_wall), f"{c.cli_rss:.0f}", f"{c.base_rss:.0f}", f"{extra:.0f}",
            f"{(extra - import_mb) / c.size_mb:.2f}" if c.size_mb else "-", *[_s(c.phase(p)) for p in phases],
            f"{c.forward:.3f}", f"{core / c.forward:.2f}" if c.forward else "-",
        ])  # fmt: skip
    text = "### The whole command\n\n"
    text += markdown_table(columns, rows, "lrllr" + "r" * (len(columns) - 5))
    text += (
        "\noverhead = CLI - baseline (Python + torch/torchvision import + load + one forward); it includes "
        f"convfuse's own imports ({import_s:.2f} s and {import_mb:.0f} MB on top of torch and torchvision). "
        "extra RSS = CLI peak RSS - baseline peak RSS (the baseline holds the model once plus activations); "
        "(extra - imports) / size is the memory convfuse's work needs, over the model's size: DESIGN.md's "
        "target of 1.2x the model's size plus activations means <= ~0.2 (meaningful for large models). "
        "1 fwd = one warm float32 forward pass in the baseline process; DESIGN.md's target for "
        "trace+fold / fwd is < 1.\n\n"
    )

    deep = [c for c in cases if c.blocks]
    if deep:
        text += "### Growth with depth (deep synthetic models)\n\n"
        columns = [
            "blocks", "size MB", "CLI wall s", "overhead s", "load ms/block", "trace+fold ms/block",
            "reference+verify ms/block", "save ms/block", "CLI peak RSS MB",
        ]  # fmt: skip
        rows = []
        for c in deep:
            per = 1e3 / c.blocks
            rows.append([
                c.blocks, f"{c.size_mb:.1f}", _s(c.cli_wall), _s(c.cli_wall - c.base_wall),
                f"{c.phase('load') * per:.3f}", f"{(c.phase('trace') + c.phase('fold')) * per:.3f}",
                f"{(c.phase('reference') + c.phase('verify')) * per:.3f}", f"{c.phase('save') * per:.3f}",
                f"{c.cli_rss:.0f}",
            ])  # fmt: skip
        text += markdown_table(columns, rows) + "\n"
        if len(deep) >= 2:
            blocks = [c.blocks for c in deep]
            for label, values in (
                ("overhead (CLI - baseline)", [c.cli_wall - c.base_wall for c in deep]),
                ("load", [c.phase("load") for c in deep]),
                ("trace + fold", [c.phase("trace") + c.phase("fold") for c in deep]),
                ("reference + verify", [c.phase("reference") + c.phase("verify") for c in deep]),
                ("save", [c.phase("save") for c in deep]),
            ):
                fixed, slope, worst = linear_fit(blocks, values)
                text += (
                    f"- {label} ~= {fixed:.3f} s + {slope * 1e3:.3f} ms x blocks; "
                    f"largest deviation from that line: {worst:.0%} of the measured value\n"
                )
            text += (
                "\nLinear growth shows as small deviations from the fitted line (a quadratic step would "
                "leave the largest model far above a line through the others).\n\n"
            )
    failed = [c.name for c in cases if not c.ok]
    if failed:
        text += "**convfuse failed on:** " + ", ".join(failed) + "\n\n"
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help=f"resnet50 and {QUICK_DEPTHS} blocks, one repetition"
    )
    parser.add_argument(
        "--depths", nargs="+", type=int, metavar="N", help=f"deep model sizes (default {DEPTHS})"
    )
    parser.add_argument("--no-resnet", action="store_true", help="only the deep synthetic models")
    parser.add_argument(
        "--repeat", type=int, help="repetitions of each measurement (default 3, quick 1); medians"
    )
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of the subprocesses")
    parser.add_argument("--output", metavar="FILE.md", help="also write the report here")
    args = parser.parse_args(argv)
    depths = args.depths or (QUICK_DEPTHS if args.quick else DEPTHS)
    repeat = args.repeat or (1 if args.quick else 3)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="convfuse-cost-") as tmp:
        workdir = Path(tmp)
        imports = import_cost(repeat, subprocess_env(args.threads))
        cases = prepare(workdir, depths, not args.no_resnet)
        for case in cases:
            measure(case, workdir, repeat, args.threads)
            print(
                f"[{time.perf_counter() - started:5.0f}s] {case.name}: CLI {case.cli_wall:.2f}s "
                f"{case.cli_rss:.0f} MB, baseline {case.base_wall:.2f}s {case.base_rss:.0f} MB",
                file=sys.stderr,
                flush=True,
            )
    elapsed = time.perf_counter() - started
    torch.set_num_threads(args.threads)
    text = header(
        "Tool cost: the convfuse command",
        f"{args.threads} threads (OMP_NUM_THREADS), medians of {repeat} run(s), run took {elapsed:.0f} s",
    )
    text += "\n" + render(cases, imports)
    emit(text, args.output)
    return 0 if all(c.ok for c in cases) else 1


if __name__ == "__main__":
    sys.exit(main())
