"""The HTML of the job list, a job's page and the preview page (plain HTML, a little inline script)."""

from __future__ import annotations

import html
import json
from urllib.parse import quote

from longcat_job.api import SAMPLERS, ValidationSpec
from longcat_job.progress import TrainerProgress
from longcat_job.validation_grid import render_grid

STYLE = """<style>
body { font-family: sans-serif; margin: 1em 2em; }
table.jobs td, table.jobs th { padding: 4px 10px; text-align: left; border-bottom: 1px solid #ddd; }
.error { color: #a00; } .note { color: #555; }
form.preview label { display: block; margin: 6px 0; }
form.preview input[type=number] { width: 7em; }
</style>"""


def page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>{STYLE}"
            f"</head><body><p><a href='/'>jobs</a></p><h1>{html.escape(title)}</h1>{body}</body></html>")


def job_url(job_id: str, rest: str = "") -> str:
    return f"/jobs/{quote(job_id, safe='')}{rest}"


def file_url(job_id: str, key: str) -> str:
    return job_url(job_id, f"/files/{quote(key)}")


def summary(progress: TrainerProgress | None, cluster_status: dict | None) -> dict:
    """What the list and the job page show: phase, step/max, ETA, restarts, bad samples."""
    status = cluster_status or {}
    known = progress.progress if progress else None
    step = known.step if known else status.get("progress", {}).get("step", 0)
    max_steps = known.max_steps if known else status.get("progress", {}).get("maxSteps", 0)
    phase = status.get("phase") or (progress.phase if progress else "unknown")
    eta = known.eta_seconds if known and phase in ("Training", "Running") else None
    bad = progress.bad_samples if progress else None
    return {
        "phase": phase,
        "step": f"{step}/{max_steps}",
        "eta": "-" if eta is None else f"{eta:.0f} s",
        "restarts": str(status["restarts"]) if "restarts" in status else "-",
        "bad_samples": f"{bad.count} of {bad.total}" if bad else "-",
        "bad_examples": bad.examples if bad else [],
        "failure": progress.failure.message if progress and progress.failure else None,
    }


def job_list(rows: list[tuple[str, dict]], notes: list[str]) -> str:
    cells = "".join(
        f"<tr class='job'><td><a href='{job_url(job_id)}'>{html.escape(job_id)}</a></td>"
        + "".join(f"<td>{html.escape(s[k])}</td>" for k in ("phase", "step", "eta", "restarts", "bad_samples"))
        + f"<td><a href='{job_url(job_id, '/preview')}'>preview</a></td></tr>"
        for job_id, s in rows
    )
    table = ("<table class='jobs' id='jobs'><tr><th>job</th><th>phase</th><th>step</th><th>ETA</th>"
             f"<th>restarts</th><th>bad samples</th><th></th></tr>{cells}</table>") if rows else "<p>No jobs found.</p>"
    return page("LongCat-Video I2V jobs", table + "".join(f"<p class='note'>{html.escape(n)}</p>" for n in notes))


CHART_SCRIPT = """<script src="/static/plotly.min.js"></script>
<script>
function ema(values, weight) {
  let average = 0, total = 0;
  return values.map(v => {
    if (v === null) return null;
    average = weight * average + (1 - weight) * v; total = weight * total + (1 - weight);
    return average / total;
  });
}
async function drawLoss(url, weight) {
  const chart = document.getElementById("loss-chart");
  if (typeof Plotly === "undefined") { chart.textContent = "plotly.js is not installed on the server (pip install plotly)"; return; }
  const history = await (await fetch(url)).json();
  if (!history.step.length) { chart.textContent = "No training steps yet."; return; }
  const traces = [
    {x: history.step, y: history.loss, name: "loss", mode: "lines", line: {color: "#9db3e6", width: 1}},
    {x: history.step, y: ema(history.loss, weight), name: "loss, smoothed", mode: "lines", line: {color: "#1f3a9e", width: 2}},
    {x: history.step, y: history.lr, name: "learning rate", mode: "lines", yaxis: "y2", line: {color: "#d9822b"}},
  ];
  const layout = {xaxis: {title: {text: "step"}}, yaxis: {title: {text: "training loss"}},
    yaxis2: {title: {text: "learning rate"}, overlaying: "y", side: "right", exponentformat: "e",
      rangemode: "tozero"},  // a constant rate sits at its value, not in a range around it
    margin: {t: 30}, legend: {orientation: "h"}, dragmode: "zoom"};
  await Plotly.newPlot(chart, traces, layout, {responsive: true});
  const slider = document.getElementById("smoothing");
  slider.oninput = () => {
    document.getElementById("smoothing-value").textContent = slider.value;
    Plotly.restyle(chart, {y: [ema(history.loss, Number(slider.value))]}, [1]);
  };
}
</script>"""


def job_page(job_id: str, s: dict, entries: list[dict], loras: dict[str, list[str]], weights: str | None) -> str:
    facts = "".join(f"<tr><th>{label}</th><td id='{key}'>{html.escape(s[key])}</td></tr>" for key, label in
                    (("phase", "phase"), ("step", "step"), ("eta", "ETA"), ("restarts", "restarts"),
                     ("bad_samples", "bad samples")))
    bad = "".join(f"<li>{html.escape(e)}</li>" for e in s["bad_examples"])
    failure = f"<p class='error'>{html.escape(s['failure'])}</p>" if s["failure"] else ""
    files = "".join(
        f"<li>{html.escape(_lora_label(folder))}: "
        + ", ".join(f"<a href='{file_url(job_id, key)}?download=1'>{html.escape(key[len(folder):])}</a>" for key in keys)
        + "</li>"
        for folder, keys in loras.items()
    ) or "<li>none yet</li>"
    body = (
        f"<table class='jobs'>{facts}</table>{failure}"
        + (f"<details><summary>bad samples</summary><ul>{bad}</ul></details>" if bad else "")
        + f"<p><a id='preview-link' href='{job_url(job_id, '/preview')}'>preview a LoRA of this job</a> · "
        f"<a href='{file_url(job_id, 'index.html')}'>static report</a></p>"
        "<h2>loss</h2><label>smoothing <input type='range' id='smoothing' min='0' max='0.99' step='0.01' "
        "value='0.9'> <span id='smoothing-value'>0.9</span></label>"
        "<div id='loss-chart' style='width:100%;max-width:1000px;height:420px'></div>"
        f"{CHART_SCRIPT}<script>drawLoss({json.dumps(job_url(job_id, '/loss.json'))}, 0.9);</script>"
        "<h2>validation</h2>"
        f"{render_grid(entries, lambda key: file_url(job_id, key), weights)}"
        f"<h2>LoRA files and checkpoints</h2><ul id='lora-files'>{files}</ul>"
    )
    return page(f"job {job_id}", body)


def _lora_label(folder: str) -> str:
    if folder.startswith("checkpoints/step-"):
        return f"checkpoint at step {int(folder.rstrip('/').rsplit('-', 1)[1])}"
    return "final LoRA"


PREVIEW_SCRIPT = """<script>
function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result); reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}
function show(id, html) { document.getElementById(id).innerHTML = html; }
function escapeHtml(text) { const d = document.createElement("div"); d.textContent = text; return d.innerHTML; }
async function submitPreview(event) {
  event.preventDefault();
  const form = event.target, file = form.image.files[0];
  const body = {job: form.dataset.job, image: file ? await readFile(file) : "", sample: file ? "" : form.sample.value,
    prompt: form.prompt.value, negative_prompt: form.negative_prompt.value, steps: Number(form.steps.value),
    guidance: Number(form.guidance.value), seed: Number(form.seed.value), lora_strength: Number(form.lora_strength.value),
    sampler: form.sampler.value, lora: form.lora.value};
  show("errors", ""); show("result", "");
  const response = await fetch("/api/preview", {method: "POST", headers: {"Content-Type": "application/json"},
                                                 body: JSON.stringify(body)});
  const answer = await response.json();
  if (!response.ok) {
    show("errors", "<ul>" + answer.errors.map(e => `<li><b>${escapeHtml(e.field)}</b>: ${escapeHtml(e.message)}</li>`).join("") + "</ul>");
    return;
  }
  poll(answer.id);
}
async function poll(id) {
  const s = await (await fetch(`/api/preview/${id}`)).json();
  const status = document.getElementById("status");
  status.dataset.state = s.state;
  if (s.state === "queued") status.textContent = `queued: place ${s.place} in the queue`;
  else if (s.state === "running") status.textContent = s.done ? `running: step ${s.done} of ${s.total}, ETA ${s.eta.toFixed(0)} s` : "running: loading the model";
  else if (s.state === "failed") { status.textContent = "failed"; show("errors", `<p>${escapeHtml(s.error)}</p>`); return; }
  else if (s.state === "done") {
    status.textContent = `done in ${s.seconds.toFixed(1)} s`;
    show("result", `<video id="preview-video" src="${s.video}" width="416" controls autoplay loop muted playsinline></video>` +
                   `<p><a id="download" href="${s.video}?download=1" download>download the MP4</a></p>`);
    return;
  }
  setTimeout(() => poll(id), 500);
}
</script>"""


def preview_page(job_id: str, validation: ValidationSpec, loras: dict[str, list[str]], starts: list[dict],
                 disabled: str | None) -> str:
    if disabled:
        return page(f"preview: {job_id}", f"<p class='error' id='preview-disabled'>The preview is disabled: "
                    f"{html.escape(disabled)}</p>")
    lora_options = "".join(f"<option value='{html.escape(f)}'>{html.escape(_lora_label(f))}</option>" for f in loras)
    sample_options = "".join(f"<option value='{html.escape(s['key'])}'>{html.escape(s['name'])}</option>" for s in starts)
    samplers = "".join(f"<option{' selected' if s == validation.sampler else ''}>{s}</option>" for s in SAMPLERS)
    prompt = starts[0]["prompt"] if starts else ""

    def number(name: str, label: str, value: object, step: str = "1") -> str:
        return f"<label>{label} <input type='number' name='{name}' value='{value}' step='{step}'></label>"

    body = (
        f"<p>{html.escape(validation.resolution)}, {validation.frames} frames (the job's validation size).</p>"
        f"<form class='preview' id='preview-form' data-job='{html.escape(job_id)}' onsubmit='submitPreview(event)'>"
        "<label>start frame: upload <input type='file' name='image' accept='image/*'></label>"
        f"<label>or one of the job's <select name='sample'>{sample_options}<option value=''>(none)</option></select></label>"
        f"<label>prompt <textarea name='prompt' rows='3' cols='80'>{html.escape(prompt)}</textarea></label>"
        f"<label>negative prompt <textarea name='negative_prompt' rows='2' cols='80'>"
        f"{html.escape(validation.negative_prompt)}</textarea></label>"
        + number("steps", "steps", validation.num_inference_steps)
        + number("guidance", "guidance", validation.guidance, "0.1")
        + number("seed", "seed", validation.seed)
        + number("lora_strength", "LoRA strength", 1.0, "0.05")
        + f"<label>sampler <select name='sampler'>{samplers}</select></label>"
        f"<label>LoRA <select name='lora'>{lora_options}<option value=''>none (the base model)</option></select></label>"
        "<button type='submit' id='generate'>generate</button></form>"
        "<div id='errors' class='error'></div><p id='status'></p><div id='result'></div>"
        f"{PREVIEW_SCRIPT}"
    )
    return page(f"preview: {job_id}", body)
