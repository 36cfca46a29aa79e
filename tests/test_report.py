"""`libero-eval report`: report.html (self-contained, rendered in headless Chromium and checked on the
rendered DOM) and summary.md, from a finished, partial or resumed run directory, with offline fidelity
beside closed-loop success when a replay summary exists."""
from __future__ import annotations

import base64
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from libero_eval.cli import main
from libero_eval.plots import varying_signals
from libero_eval.report import ReportError, load_run, parse_timelines, pick_timelines, worth_a_timeline, write_report
from libero_eval.store import ResultStore
from tests.report_helpers import BASELINE, CACHED, REPLAY, TASKS, TRIALS, make_run_dir

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


@pytest.fixture(scope="module")
def reported(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("report") / "synth"
    make_run_dir(run_dir, replay=True)
    html_path, md_path = write_report(run_dir)
    return run_dir, html_path, md_path


class _Dom(HTMLParser):
    """Tables (id -> rows of cell texts), images and links of an HTML document."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[dict[str, str]] = []
        self.videos: list[dict[str, str]] = []
        self.links: list[str] = []
        self._table = None
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = attrs.get("id", f"table{len(self.tables)}")
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(attrs)
        elif tag == "video":
            self.videos.append(attrs)
        elif tag == "a":
            self.links.append(attrs.get("href", ""))

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._table:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


_PROBE = """<p id="probe"></p><script>
const sizes = []; const videos = document.querySelectorAll("video");
videos.forEach((v, i) => { v.preload = "auto"; v.addEventListener("loadeddata", () => {
  sizes[i] = v.videoWidth + "x" + v.videoHeight;
  if (sizes.filter(Boolean).length === videos.length) document.getElementById("probe").textContent = sizes.join(" ");
}); v.load(); });</script>"""


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("Debian's chromium is not installed and launch/setup.sh (which installs it) was not run "
                    "with root; install it with `apt-get install chromium`")
    return path


def test_report_tables_hold_the_stored_numbers(reported):
    run_dir, html_path, md_path = reported
    dom = _Dom(html_path.read_text())
    policies = dom.tables["policies-table"]
    assert policies[0][:3] == ["policy", "suite", "success [95% CI]"]
    rows = {r[0]: r for r in policies[1:]}
    assert rows[BASELINE][2] == "3/6 50% [19%-81%]" and rows[BASELINE][3] == "(baseline)"
    assert rows[CACHED][2] == "2/5 40% [12%-77%]" and rows[CACHED][3] == "-1/+0 p=1.00 d>=97"
    assert rows[CACHED][4] == "40%" and rows[CACHED][7] == "1.31x" and rows[CACHED][-1] == "1"
    episodes = dom.tables["episodes-table"][1:]
    assert len(episodes) == len(TASKS) * TRIALS * 2
    assert sum(e[4] == "error: policy_error" for e in episodes) == 1
    tasks = dom.tables["tasks-table"]
    assert tasks[0] == ["suite", "task", "name", BASELINE, CACHED]
    assert tasks[1][3:] == ["2/3 67% [21%-94%]", "1/3 33% [6%-79%]"]
    # self-contained: every image inline, every video link relative and pointing at a file
    assert dom.images and all(img["src"].startswith("data:image/png;base64,") for img in dom.images)
    assert all(base64.b64decode(img["src"].split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n" for img in dom.images)
    videos = [link for link in dom.links if link.endswith(".mp4")]
    assert len(videos) == len(episodes) - 1 and all((run_dir / v).is_file() for v in videos)
    assert not any(link.startswith(("/", "http", "file:")) for link in dom.links)
    md = md_path.read_text()
    assert "complete: 12 of 12 planned episodes" in md
    assert f"| {CACHED} | libero_spatial | 2/5 40% [12%-77%] | -1/+0 p=1.00 d>=97 |" in md
    assert (run_dir / "report" / "success_by_policy.png").is_file()


def test_offline_fidelity_sits_beside_closed_loop_success(reported):
    _, html_path, md_path = reported
    dom = _Dom(html_path.read_text())
    fidelity = {r[0]: r for r in dom.tables["fidelity-table"][1:]}
    header = dom.tables["fidelity-table"][0]
    row = dict(zip(header, fidelity[CACHED]))
    cached = REPLAY["policies"][1]
    assert row["closed-loop success [95% CI]"] == "2/5 40% [12%-77%]"
    assert row["cos mean"] == f"{cached['cos_mean']:.4f}" and row["cos p5"] == f"{cached['cos_p5']:.4f}"
    assert row["replay frames"] == "24" and row["compute skipped"] == "31%"
    assert dom.tables["signals-table"][1] == [CACHED, "pixel_mae", "5.1", "6.8", "8.9", "9.6"]
    assert "Offline fidelity beside closed-loop success" in md_path.read_text()


def test_partial_resumed_and_plain_run_directories(tmp_path):
    run_dir = tmp_path / "partial"
    _, results = make_run_dir(run_dir, store=False)
    store = ResultStore(run_dir)
    for r in results[:5]:
        store.append(r)
    write_report(run_dir)
    assert "partial: 5 of 12 planned episodes stored" in (run_dir / "summary.md").read_text()
    for r in results[5:]:  # the sweep resumed and finished
        store.append(r)
    assert main(["report", str(run_dir)]) == 0
    assert "complete: 12 of 12" in (run_dir / "summary.md").read_text()
    assert "Scene layouts: openpi's evaluation layout for each init state" in (run_dir / "summary.md").read_text()
    # a run directory from before env.seeding existed ran per-episode layouts
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    del config["env"]["seeding"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    write_report(run_dir)
    assert "Scene layouts: the paired per-episode seed's" in (run_dir / "summary.md").read_text()
    assert "Scene layouts: the paired per-episode seed&#x27;s" in (run_dir / "report.html").read_text()
    assert "Offline fidelity" not in (run_dir / "report.html").read_text()
    # a `libero-eval run` directory: no config.yaml, variants from the results
    (run_dir / "config.yaml").unlink()
    data = load_run(run_dir)
    assert data.planned is None and data.baseline == BASELINE and data.variants[CACHED]["window"] == 3
    write_report(run_dir)
    assert "12 episodes stored" in (run_dir / "summary.md").read_text()


def test_report_without_results_says_so(tmp_path, capsys):
    with pytest.raises(ReportError, match="has no results.jsonl"):
        load_run(tmp_path)
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "has no results.jsonl" in capsys.readouterr().err


def test_timelines_show_the_paired_losses_first(reported):
    run_dir, _, _ = reported
    data = load_run(run_dir)
    chosen = pick_timelines(data)
    assert [r.policy_label for r in chosen] == [CACHED, CACHED]  # the baseline has no signals to plot
    assert (chosen[0].task_id, chosen[0].trial, chosen[0].success) == (0, 1, False)  # baseline solved it
    # the rest on request: all of a policy's episodes worth one, or named ones (even a flat baseline's)
    scored = [r for r in data.results if r.policy_label == CACHED and r.records]
    assert len(pick_timelines(data, parse_timelines("all"))) == len(scored) == len(TASKS) * TRIALS - 1
    assert len(pick_timelines(data, parse_timelines("1"))) == 1
    keys = [f"{BASELINE}/libero_spatial/task01/trial02", f"{CACHED}/libero_spatial/task00/trial00"]
    assert [r.key for r in pick_timelines(data, parse_timelines(",".join(keys)))] == keys
    with pytest.raises(ReportError, match="no episode 'none/libero_spatial/task09/trial00'"):
        pick_timelines(data, ["none/libero_spatial/task09/trial00"])
    with pytest.raises(ReportError, match="expected a number per policy, all, or episode keys"):
        parse_timelines("some")


def test_flat_timelines_are_not_drawn():
    """A signal that never changes is not plotted; an episode of FULL frames with only such signals gets no
    timeline (a baseline in shadow mode: its shadow cosine is 1 on every frame)."""
    flat = [{"decision": "full", "signals": {"shadow_cos": 1.0, "pixel_mae": 0.5 * i}} for i in range(2)]
    assert varying_signals(flat) == ["pixel_mae"]
    constant = [{"decision": "full", "signals": {"shadow_cos": 1.0}} for _ in range(3)]

    class Episode:
        records = constant

    assert not worth_a_timeline(Episode)
    Episode.records = constant + [{"decision": "reuse", "signals": {"shadow_cos": 1.0}}]  # a strip worth seeing
    assert worth_a_timeline(Episode)


def test_report_names_its_timeline_subset_and_takes_requests(reported, tmp_path):
    run_dir = tmp_path / "synth"
    shutil.copytree(reported[0], run_dir)
    note = _Dom((run_dir / "report.html").read_text())
    html_text = (run_dir / "report.html").read_text()
    assert "Timelines for 2 of the 12 stored episodes (per policy, up to 2: first those it failed where its " \
           "baseline succeeded" in html_text
    assert f"Not drawn: {BASELINE} (every frame FULL" in html_text and "--timelines all" in html_text
    assert len(note.videos) == 2
    assert main(["report", str(run_dir), "--timelines", "all"]) == 0
    assert len(_Dom((run_dir / "report.html").read_text()).videos) == len(TASKS) * TRIALS - 1
    assert main(["report", str(run_dir), "--timelines", "none/libero_spatial/task00/trial07"]) == 2  # no such


def test_report_renders_in_headless_chromium(reported, tmp_path):
    chromium = _chromium()
    run_dir, html_path, _ = reported
    common = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*common, "--dump-dom", html_path.resolve().as_uri()], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    rendered = _Dom(dom.stdout)
    for table in ("policies-table", "fidelity-table", "signals-table", "tasks-table", "episodes-table"):
        assert len(rendered.tables[table]) > 1, table
    ids = {img.get("id") for img in rendered.images}
    assert {"plot-success", "plot-pareto"} <= ids
    assert len(rendered.images) >= 4  # two plots + timelines
    assert "Timelines for 2 of the 12 stored episodes" in dom.stdout  # the subset note, rendered
    players = rendered.videos
    assert len(players) == 2 and all((run_dir / v["src"]).is_file() and "controls" in v for v in players)
    # the players play: a copy of the page beside it reports each video's decoded size once it loaded
    probe = html_path.with_name("report_probe.html")
    probe.write_text(html_path.read_text().replace("</body>", _PROBE + "</body>"))
    played = subprocess.run([*common, "--virtual-time-budget=10000", "--allow-file-access-from-files",
                             "--dump-dom", probe.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    probe.unlink()
    loaded = re.search(r'<p id="probe">([^<]*)</p>', played.stdout)
    assert loaded and loaded.group(1) == "64x112 64x112", (loaded, played.stderr[-2000:])
    shot = tmp_path / "report.png"
    proc = subprocess.run([*common, "--window-size=1280,2600", f"--screenshot={shot}", html_path.resolve().as_uri()],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1280, 2600)
        colours = image.convert("RGB").resize((64, 128)).getcolors(64 * 128)
        assert colours is not None and len(colours) > 20, "the screenshot is blank"
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(shot, ARTIFACTS / "report_screenshot.png")
