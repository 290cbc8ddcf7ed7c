"""The GPU suite's results (benchmarks/gpu_check.sh) as one Markdown page: DIR/gpu_summary.md.

    python benchmarks/gpu_summary.py [reports/benchmarks]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def fmt(x, spec: str = ".1f") -> str:
    return "–" if x is None else format(x, spec)


def percent(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "reports/benchmarks")
    lines = []
    profiles = sorted(folder.glob("profile_*.json"))
    if profiles:
        lines += ["## Step profiles (benchmarks/profile_step.py)", "",
                  "| run | batch | step ms | samples/s | kernel ms/step | GPU idle ms/step | launches/step "
                  "| host syncs/step | data path ms/step | step / kernel time | MFU | peak MB |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for path in profiles:
            r = json.loads(path.read_text())
            pr, st = r.get("profile", {}), r["setup"]
            lines.append(
                f"| {path.stem} | {st['batch_size']} | {fmt(r['step_ms'], '.2f')} | {fmt(r['samples_per_s'], '.0f')} "
                f"| {fmt(pr.get('kernel_ms_per_step'), '.2f')} | {fmt(pr.get('gpu_idle_ms_per_step'), '.2f')} "
                f"| {fmt(pr.get('launches_per_step'), '.0f')} | {fmt(pr.get('host_syncs_per_step'), '.2f')} "
                f"| {fmt(pr.get('data_path_host_ms_per_step'), '.2f')} | {fmt(r.get('step_over_kernel_time'), '.2f')} "
                f"| {percent(r['mfu'])} "
                f"| {fmt(r.get('peak_gpu_mb', r.get('peak_rss_mb')), '.0f')} |")
        lines.append("")
    runs = sorted(folder.glob("train_throughput_*_*.json"))
    if runs:
        lines += ["## Against open_clip, same run (benchmarks/train_throughput.py)", "",
                  "| run | batch | ours samples/s | open_clip | ratio | model only: ours | open_clip | ratio "
                  "| MFU ours | MFU open_clip | peak MB ours | open_clip |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for path in runs:
            r = json.loads(path.read_text())
            mo, mfu, peak = r["model_only"], r.get("mfu") or {}, r.get("peak_gpu_mb_by_side") or {}
            lines.append(
                f"| {path.stem} | {r['setup']['batch_size']} | {fmt(r['ours_samples_per_s'], '.0f')} "
                f"| {fmt(r['open_clip_samples_per_s'], '.0f')} | **{fmt(r['ratio'], '.2f')}×** "
                f"| {fmt(mo['ours_samples_per_s'], '.0f')} | {fmt(mo['open_clip_samples_per_s'], '.0f')} "
                f"| {fmt(mo['ratio'], '.2f')}× | {percent(mfu.get('ours'))} | {percent(mfu.get('open_clip'))} "
                f"| {fmt(peak.get('ours'), '.0f')} | {fmt(peak.get('open_clip'), '.0f')} |")
        lines.append("")
    for path in sorted(folder.glob("loss_memory_*.json")):
        r = json.loads(path.read_text())
        lines += [f"## Contrastive loss, one rank of {r['setup']['world']} ({path.name})", "",
                  "| global batch | variant | rows | ms | peak MB above inputs |", "|---|---|---|---|---|"]
        lines += [f"| {x['global_batch']} | {x['variant']} | {x['rows']} | {fmt(x.get('ms'), '.1f')} "
                  f"| {'OOM' if x.get('oom') else fmt(x.get('peak_mb_above_inputs'), '.0f')} |" for x in r["results"]]
        lines.append("")
    text = "\n".join(lines)
    (folder / "gpu_summary.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
