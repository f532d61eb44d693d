"""The validation grid: per validation sample one row, start frame | source clip | the video generated after
each validation step, with one control that plays every video from its start together.

Torch-free HTML, rendered from validation/index.json, for the static index.html in the bucket (relative keys:
it opens from disk or S3 without a server) and for the UI server's job page (keys routed through the server).
"""

from __future__ import annotations

import html
from collections.abc import Callable

from .api import EmaSpec

# Plain inline script: rewinding every video and starting them in one task keeps them in step.
SYNC_SCRIPT = """<script>
function playAllInSync(root) {
  const videos = Array.from((root || document).querySelectorAll("video.sync"));
  videos.forEach(v => { v.pause(); v.currentTime = 0; });
  videos.forEach(v => v.play().catch(() => {}));
}
function pauseAll(root) { (root || document).querySelectorAll("video.sync").forEach(v => v.pause()); }
</script>"""

STYLE = """<style>
table.grid td, table.grid th { vertical-align: top; padding: 4px; text-align: left; }
table.grid small { display: block; max-width: 320px; }
</style>"""


def _video(url: str, poster: str | None = None) -> str:
    poster_attr = f' poster="{html.escape(poster)}"' if poster else ""
    return (f'<video class="sync" src="{html.escape(url)}"{poster_attr} controls loop muted playsinline '
            f'preload="metadata" width="320"></video>')


def weights_shown(ema: EmaSpec | None) -> str:
    """Which adapter weights the validation videos show (spec.training.ema)."""
    if ema is None:
        return "the trained adapter weights (no EMA)"
    return f"the EMA of the adapter weights (decay {ema.decay}, updated every {ema.every_steps} steps)"


def render_grid(entries: list[dict], url: Callable[[str], str] = lambda key: key, weights: str | None = None) -> str:
    """The grid and its controls; `url` turns an output key into the link the page uses; `weights`
    (weights_shown) is said above it when known."""
    steps = sorted({e["step"] for e in entries})
    by_sample: dict[int, dict[int, dict]] = {}
    for entry in entries:
        for f in entry["files"]:
            by_sample.setdefault(f["index"], {})[entry["step"]] = f
    if not by_sample:
        return "<p>No validation videos yet.</p>"
    head = "<th>sample</th><th>start frame</th><th>source clip</th>" + "".join(f"<th>step {s}</th>" for s in steps)
    rows = []
    for index in sorted(by_sample):
        files = by_sample[index]
        first = files[min(files)]
        start = f'<img src="{html.escape(url(first["start"]))}" width="320" alt="start frame">' if first.get("start") else "-"
        clip = _video(url(first["clip"])) if first.get("clip") else "-"
        cells = "".join(
            f"<td>{_video(url(files[s]['mp4']), url(files[s]['png']))}<br>"
            f"<a href=\"{html.escape(url(files[s]['png']))}\">contact sheet</a></td>" if s in files else "<td>-</td>"
            for s in steps
        )
        rows.append(f"<tr><th>{html.escape(first['name'])}<small>{html.escape(first['prompt'])}</small></th>"
                    f"<td>{start}</td><td>{clip}</td>{cells}</tr>")
    controls = ('<p><button type="button" id="play-all" onclick="playAllInSync()">play all in sync</button> '
                '<button type="button" onclick="pauseAll()">pause</button></p>')
    said = f"<p id=\"weights\">The videos show {html.escape(weights)}.</p>" if weights else ""
    return f"{STYLE}{SYNC_SCRIPT}{said}{controls}<table class=\"grid\"><tr>{head}</tr>{''.join(rows)}</table>"
