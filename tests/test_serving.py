"""Registered models as MLflow sees them: pyfunc load, `mlflow models serve`, the routing page.

One small pipeline (two domains, one composition mode) runs cluster -> experts -> compose ->
evaluate on local Ray with a private sqlite store; MLflow's own loader and server are real.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest

import textgen
from conftest import free_port, wait_for_http
from stores import module_home
from artifacts import ChecksumError
from pipeline.catalog import CENTRAL_MODEL, CHAMPION, COMPOSITION_MODEL, EXPERT_MODEL, Catalog
from pipeline.config import load_config
from pipeline.sampling import score_texts
from pipeline.stages.cluster import run_cluster
from pipeline.stages.compose import run_compose
from pipeline.stages.evaluate import ROUTING_PAGE, run_evaluate
from pipeline.stages.experts import run_experts

REPO = Path(__file__).resolve().parents[1]
SMALL = ["cluster.k=2", "cluster.svd_dim=8", "cluster.min_df=1", "tracking.experiment=serving",
         "experts.train.max_tokens=12000", "experts.train.ckpt_every=0", "compose.modes=[independent]",
         "compose.routing=router",  # the default: cBTM picks, gates scale
         "compose.blocks_train={max_tokens: 8000, batch_size: 8, lr: 0.003, warmup_steps: 1}",
         "compose.gates_train={max_tokens: 4000, batch_size: 8, lr: 0.005, warmup_steps: 1}",
         "compose.eval_tokens=2048", "compose.center_tokens=2048", "compose.dense_matched=false",
         "evaluate.max_bytes_per_domain=3000"]
TEXT = "Stir the onions into the butter and let them soften. The wind backed to the west."


@pytest.fixture(scope="module")
def served(tmp_path_factory, ray_local):
    """A finished pipeline in a private store; MLflow's registry pointed at it."""
    with module_home(tmp_path_factory, "serving-home") as home:
        path = home / "docs.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in textgen.corpus(25, ["cooking", "sailing"], seed=0)))
        cfg = load_config(REPO / "configs" / "tiny.yaml", ["corpus.source=files", f"corpus.files=[{path}]", *SMALL])
        pipeline_id = run_cluster(cfg)
        run_experts(cfg, pipeline_id)
        run_compose(cfg, pipeline_id)
        run_evaluate(cfg, pipeline_id)
        catalog = Catalog(cfg)
        previous = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
        mlflow.set_tracking_uri(catalog.tracker.uri)
        mlflow.set_registry_uri(catalog.tracker.uri)
        try:
            yield {"cfg": cfg, "pipeline": pipeline_id, "catalog": catalog, "home": home}
        finally:
            mlflow.set_tracking_uri(previous[0])
            mlflow.set_registry_uri(previous[1])


def uris(catalog: Catalog) -> dict[str, str]:
    """One registered URI of each kind."""
    return {"expert": f"models:/{EXPERT_MODEL}/1", "central": f"models:/{CENTRAL_MODEL}/1",
            "composition": f"models:/{COMPOSITION_MODEL}@{CHAMPION}"}


REQUESTS = pd.DataFrame({"prompt": ["The wind", "Stir the"], "max_new_tokens": [24, 16], "seed": [3, 4]})


@pytest.mark.parametrize("kind", ["expert", "central", "composition"])
def test_mlflow_pyfunc_loads_each_kind_of_registered_model_and_generates_repeatably(served, kind):
    model = mlflow.pyfunc.load_model(uris(served["catalog"])[kind])
    first, again = model.predict(REQUESTS), model.predict(REQUESTS)
    assert list(first["text"]) == list(again["text"])
    assert [len(t.encode("utf-8", errors="replace")) for t in first["text"]] <= [24, 16]
    assert all(first["text"]) and first["text"][0] != model.predict(REQUESTS.assign(seed=[5, 4]))["text"][0]
    if kind == "composition":
        n_experts = len(served["catalog"].resolve(uris(served["catalog"])[kind]).tags["moie.experts"].split(","))
        assert [len(e) for e in first["experts"]] == [24, 16]
        assert {e for row in first["experts"] for e in row} <= set(range(-1, n_experts))
    else:
        assert "experts" not in first.columns


def test_score_mode_gives_the_bits_per_byte_moie_itself_computes(served, tmp_path):
    catalog = served["catalog"]
    uri = uris(catalog)["composition"]
    model = mlflow.pyfunc.load_model(uri)
    table = model.predict(pd.DataFrame({"prompt": [TEXT, TEXT[:20]]}), params={"score": True})
    own, _ = catalog.load_registered(uri, tmp_path)
    expected = score_texts(own, [TEXT, TEXT[:20]])
    assert list(table["bytes"]) == [len(TEXT), 20]
    assert table["bits_per_byte"].tolist() == pytest.approx([bpb for bpb, _ in expected], rel=1e-6)
    assert 0 < table["bits_per_byte"][0] < 8


def test_a_bad_request_is_refused_naming_the_field(served):
    model = mlflow.pyfunc.load_model(uris(served["catalog"])["expert"])
    with pytest.raises(Exception, match="top_k must be at least 1"):
        model.predict(pd.DataFrame({"prompt": ["x"], "top_k": [0]}))
    with pytest.raises(Exception, match=r"missing inputs \['prompt'\]"):  # MLflow checks the signature
        model.predict(pd.DataFrame({"text": ["x"]}))


def test_no_pickle_among_any_logged_artifact_and_every_model_is_code_plus_safetensors(served):
    catalog = served["catalog"]
    for name in (EXPERT_MODEL, CENTRAL_MODEL, COMPOSITION_MODEL):
        for version in catalog.versions(name):
            root = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version.version}"))
            mlmodel = (root / "MLmodel").read_text()
            # built by running its code (models from code), not by unpickling a python_model.pkl
            assert "loader_module: mlflow.pyfunc.loaders.code_model" in mlmodel and "python_model:" not in mlmodel
            assert (root / "pyfunc_entry.py").is_file() and ".pkl" not in mlmodel
            assert any(p.suffix == ".safetensors" for p in (root / "artifacts").rglob("*"))
    logged = [p for p in (served["home"] / "artifacts").rglob("*") if p.is_file()]  # every run's artifacts
    assert len(logged) > 20
    assert not [p for p in logged if p.suffix in (".pkl", ".pickle", ".joblib", ".pt", ".pth", ".bin")]


def test_a_tampered_weights_file_is_refused_on_load(served, tmp_path):
    local = Path(mlflow.artifacts.download_artifacts(uris(served["catalog"])["expert"], dst_path=str(tmp_path)))
    weights = local / "artifacts" / "model" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # one bit of one weight
    weights.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="model.safetensors has sha256"):
        mlflow.pyfunc.load_model(str(local))


def test_a_composition_refuses_an_expert_whose_registered_file_was_tampered_with(served, tmp_path):
    catalog = served["catalog"]
    composition = catalog.resolve(uris(catalog)["composition"])
    expert = catalog.resolve(json.loads(composition.tags["moie.experts"])[0])
    stored = Path(catalog.client.get_run(expert.run_id).info.artifact_uri.removeprefix("file://"))
    weights = stored / "model" / "artifacts" / "model" / "model.safetensors"
    original = weights.read_bytes()
    try:
        weights.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
        with pytest.raises(ChecksumError, match="model.safetensors"):
            mlflow.pyfunc.load_model(uris(catalog)["composition"])
    finally:
        weights.write_bytes(original)


def post(port: int, payload: dict, timeout: float = 60) -> dict:
    """The server's JSON answer; (status, body) in the AssertionError of a refused request."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        raise AssertionError((err.code, err.read().decode())) from None


def test_moie_serve_answers_invocations_deterministically_and_stops_with_its_command(served, tmp_path):
    catalog = served["catalog"]
    uri = uris(catalog)["composition"]
    port = free_port()
    log = tmp_path / "serve.log"
    env = dict(os.environ, MOIE_HOME=str(served["home"]))
    env.pop("MLFLOW_TRACKING_URI", None)
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "serve", uri, "--port", str(port),
                                 "--config", str(REPO / "configs" / "tiny.yaml"), "--set", "tracking.experiment=serving"],
                                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", proc, log, "moie serve", timeout=180)
        payload = {"dataframe_records": [{"prompt": "The wind", "max_new_tokens": 20, "seed": 7}]}
        first, again = post(port, payload), post(port, payload)
        assert first == again
        (row,) = first["predictions"]
        local = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame(payload["dataframe_records"]))
        assert row["text"] == local["text"][0] and row["experts"] == list(local["experts"][0])
        scored = post(port, {"dataframe_records": [{"prompt": TEXT}], "params": {"score": True}})
        assert scored["predictions"][0]["bytes"] == len(TEXT)
        with pytest.raises(AssertionError, match="400.*temperature must be >= 0"):
            post(port, {"dataframe_records": [{"prompt": "x", "temperature": -1.0}]})
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
    with pytest.raises(ProcessLookupError):
        os.killpg(proc.pid, 0)  # the server's whole process group is gone


def routing_page(served, tmp_path) -> Path:
    catalog = served["catalog"]
    (run,) = catalog.tracker.stage_runs(served["pipeline"], "evaluate")
    return Path(catalog.tracker.download_artifacts(run.info.run_id, ROUTING_PAGE, tmp_path))


def test_the_routing_page_is_self_contained_and_names_every_expert_of_the_champion(served, tmp_path):
    page = routing_page(served, tmp_path).read_text(encoding="utf-8")
    catalog = served["catalog"]
    for uri in json.loads(catalog.resolve(uris(catalog)["composition"]).tags["moie.experts"]):
        assert uri in page
    assert "<script" not in page and "url(" not in page and "@import" not in page and "http" not in page.lower()
    assert "cooking" in page and "sailing" in page  # one held-out document of each domain


def expert_hues_on_screen(png: Path, hues: list[float]) -> dict[int, int]:
    """Pixels whose hue is within 8 degrees of each expert's hue (coloured pixels only, not text or white)."""
    import matplotlib.colors
    import numpy as np
    from PIL import Image

    rgb = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64).reshape(-1, 3) / 255
    hsv = matplotlib.colors.rgb_to_hsv(rgb)
    coloured = hsv[(hsv[:, 1] > 0.05) & (hsv[:, 2] > 0.3)]  # pale backgrounds count, grey and black text do not
    counts = {}
    for e, hue in enumerate(hues):
        distance = np.abs(coloured[:, 0] * 360 - hue)
        counts[e] = int((np.minimum(distance, 360 - distance) < 8).sum())
    return counts


@pytest.mark.skipif(shutil.which("chromium") is None and not os.environ.get("MOIE_REQUIRE_CHROMIUM"),
                    reason="Debian's chromium is not installed (apt-get install chromium; .ci/run installs it "
                           "and sets MOIE_REQUIRE_CHROMIUM=1, so there this test cannot be skipped)")
def test_the_routing_page_renders_in_headless_chromium_with_more_than_one_expert_colour(served, tmp_path):
    from pipeline.routing_page import expert_hue

    page = routing_page(served, tmp_path)
    text_only = tmp_path / "text-only.html"  # the legend's swatches hidden: only the coloured text counts
    text_only.write_text(page.read_text(encoding="utf-8").replace("</style>", ".legend { display: none; }</style>"),
                         encoding="utf-8")
    png = tmp_path / "page.png"
    profile = tmp_path / "chromium-profile"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={profile}", "--window-size=1200,1600", f"--screenshot={png}",
                    text_only.as_uri()], check=True, capture_output=True, timeout=120)
    catalog = served["catalog"]
    n = len(json.loads(catalog.resolve(uris(catalog)["composition"]).tags["moie.experts"]))
    counts = expert_hues_on_screen(png, [expert_hue(e) for e in range(n)])
    assert sum(c > 500 for c in counts.values()) >= 2, counts
